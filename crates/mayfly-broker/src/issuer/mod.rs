//! What the broker issues with: JWT signing keys and the signer.

mod jwt;
mod keys;
pub mod x509;

pub use jwt::{AccessToken, JwtSigner, SignError};
pub use keys::{Algorithm, KeyError, SigningKey, key_path};
pub use x509::{CaError, CsrError, CsrKey, IssuingCa};
