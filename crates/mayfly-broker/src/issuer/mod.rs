//! What the broker issues with: JWT signing keys and the signer, and the
//! issuing CA that signs task certificates from CSRs. The submodules are
//! private; what follows is their whole surface: the signer and keys, the
//! key files and their schedule (`ring`, which `mayfly keys` writes), the
//! issuing CAs and theirs (`ca_ring`, which `mayfly ca` writes), and CSRs.

mod ca_ring;
mod jwt;
mod keys;
mod ring;
mod x509;

pub(crate) use ca_ring::watch_and_reload as watch_cas;
pub use ca_ring::{
    CaFile, CaFiles, CaRing, Generation, ca_files, install as install_ca, load as load_cas,
    scheduled_paths as ca_scheduled_paths,
};
pub use jwt::{AccessToken, JwtSigner, NoSigningKey, SignError};
pub use keys::{Algorithm, KeyError, Pkcs8Error, SigningKey, key_path};
pub use ring::{KeyFile, KeyRotation, key_files, load as load_keys, scheduled_path};
pub(crate) use ring::{signer, watch_and_reload as watch_keys};
pub(crate) use x509::{BACKDATE, RevokedCert, issuing_ca_params, serial_from_hex};
pub use x509::{CaError, CsrError, CsrKey, IssuingCa, parse_csr, random_serial};
