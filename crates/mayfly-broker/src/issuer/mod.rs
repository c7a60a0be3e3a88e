//! What the broker issues with: JWT signing keys and the signer, and the
//! issuing CA that signs task certificates from CSRs. The submodules are
//! private but `ring` (the key files and their schedule, which `mayfly
//! keys` writes) and `ca_ring` (the same for issuing CAs, which `mayfly ca`
//! writes); this is their whole surface.

pub mod ca_ring;
mod jwt;
mod keys;
pub mod ring;
mod x509;

pub use ca_ring::CaRing;
pub use jwt::{AccessToken, JwtSigner, SignError};
pub use keys::{Algorithm, KeyError, SigningKey, key_path};
pub(crate) use x509::{BACKDATE, RevokedCert, issuing_ca_params, serial_from_hex};
pub use x509::{CaError, CsrError, CsrKey, IssuingCa, parse_csr, random_serial};
