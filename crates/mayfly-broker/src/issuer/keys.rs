//! JWT signing keys: created on first start in the data directory (PKCS#8
//! PEM, mode 0600) and reused after restart. The private key is held parsed
//! in memory (no per-request parsing); only the public half is published.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::json;
use zeroize::Zeroizing;

use crate::fsutil::{check_private, write_new_private};

/// Why a signing key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold a usable key of the expected algorithm.
    #[error("{}: not a valid {alg} PKCS#8 key: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The expected algorithm.
        alg: &'static str,
        /// Why: the PEM, the key or the key schedule refused
        /// ([`Pkcs8Error`], [`NoSigningKey`](crate::issuer::NoSigningKey)).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// PKCS#8 DER that is not a usable key of the algorithm asked for (in
/// `ring`'s words: `InvalidEncoding`, `WrongAlgorithm`, …).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Pkcs8Error(ring::error::KeyRejected);

enum Inner {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// A parsed signing key with its key id and public JWK.
pub struct SigningKey {
    inner: Inner,
    /// RFC 7638 JWK thumbprint, base64url.
    kid: String,
    /// The public JWK, as published in the JWKS.
    jwk: serde_json::Value,
    /// ECDSA signing needs randomness.
    rng: SystemRandom,
    /// The raw public key, for checking our own tokens (introspection).
    public: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg())
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// JWT signing algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub enum Algorithm {
    /// ECDSA P-256 with SHA-256: the widest validator support.
    #[default]
    ES256,
    /// Ed25519.
    EdDSA,
}

impl Algorithm {
    /// The JWS `alg` name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
        }
    }
}

/// The key file for `alg` in `data_dir`.
pub fn key_path(data_dir: &Path, alg: Algorithm) -> PathBuf {
    match alg {
        Algorithm::ES256 => data_dir.join("jwt-es256.key"),
        Algorithm::EdDSA => data_dir.join("jwt-eddsa.key"),
    }
}

impl SigningKey {
    /// Loads the `alg` key from `data_dir`, creating it if missing.
    pub fn load_or_create(data_dir: &Path, alg: Algorithm) -> Result<Self, KeyError> {
        let path = key_path(data_dir, alg);
        if !path.exists() {
            match Self::generate_file(&path, alg) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), alg = alg.name(), "created JWT signing key")
                }
                // Another process created it first: use theirs.
                Err(KeyError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Self::load(&path, alg)
    }

    /// Writes a new `alg` key to `path` (PKCS#8 PEM, mode 0600); fails if
    /// the file exists. Replicas sharing a store must share this file.
    pub fn generate_file(path: &Path, alg: Algorithm) -> Result<(), KeyError> {
        let rcgen_alg = match alg {
            Algorithm::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Algorithm::EdDSA => &rcgen::PKCS_ED25519,
        };
        let key = rcgen::KeyPair::generate_for(rcgen_alg).map_err(|e| KeyError::Invalid {
            path: path.to_owned(),
            alg: alg.name(),
            source: Box::new(e),
        })?;
        let pem = Zeroizing::new(key.serialize_pem());
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        // Written whole under a hidden name, then linked into place: a
        // watcher never reads half a key, and of two replicas writing the
        // same name one fails with `AlreadyExists`.
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("key");
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        write_new_private(&tmp, pem.as_bytes()).map_err(io)?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        linked.map_err(io)
    }

    /// Loads an existing key file (must be mode 0600).
    pub fn load(path: &Path, alg: Algorithm) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        check_private(path).map_err(io)?;
        let pem = Zeroizing::new(std::fs::read(path).map_err(io)?);
        let invalid = |source: Box<dyn std::error::Error + Send + Sync>| KeyError::Invalid {
            path: path.to_owned(),
            alg: alg.name(),
            source,
        };
        let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| invalid(Box::new(e)))?;
        Self::from_pkcs8(der.secret_pkcs8_der(), alg).map_err(|e| invalid(Box::new(e)))
    }

    /// A key from PKCS#8 DER.
    pub fn from_pkcs8(der: &[u8], alg: Algorithm) -> Result<Self, Pkcs8Error> {
        let rng = SystemRandom::new();
        let (inner, public) = match alg {
            Algorithm::ES256 => {
                let kp = EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    der,
                    &rng,
                )
                .map_err(Pkcs8Error)?;
                let public = kp.public_key().as_ref().to_vec();
                (Inner::Es256(kp), public)
            }
            Algorithm::EdDSA => {
                let kp = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(Pkcs8Error)?;
                let public = kp.public_key().as_ref().to_vec();
                (Inner::EdDsa(kp), public)
            }
        };
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        // RFC 7638: the thumbprint hashes the required members in
        // lexicographic order, without white space.
        let (canonical, mut jwk) = match alg {
            Algorithm::ES256 => {
                // Uncompressed point: 0x04 || x (32) || y (32).
                let (x, y) = (b64(&public[1..33]), b64(&public[33..65]));
                (
                    format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#),
                    json!({"kty": "EC", "crv": "P-256", "x": x, "y": y}),
                )
            }
            Algorithm::EdDSA => {
                let x = b64(&public);
                (
                    format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
                    json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
                )
            }
        };
        let kid = b64(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref());
        jwk["kid"] = json!(kid);
        jwk["alg"] = json!(alg.name());
        jwk["use"] = json!("sig");
        Ok(Self {
            inner,
            kid,
            jwk,
            rng,
            public,
        })
    }

    /// Whether `sig` (JWS form) is this key's signature over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let alg: &dyn signature::VerificationAlgorithm = match self.inner {
            Inner::Es256(_) => &signature::ECDSA_P256_SHA256_FIXED,
            Inner::EdDsa(_) => &signature::ED25519,
        };
        signature::UnparsedPublicKey::new(alg, &self.public)
            .verify(msg, sig)
            .is_ok()
    }

    /// The JWS `alg`.
    pub fn alg(&self) -> &'static str {
        match self.inner {
            Inner::Es256(_) => "ES256",
            Inner::EdDsa(_) => "EdDSA",
        }
    }

    /// The key id (`kid`).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    /// Signs `msg`; the signature is in JWS form (r || s for ES256).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, ring::error::Unspecified> {
        match &self.inner {
            Inner::Es256(kp) => Ok(kp.sign(&self.rng, msg)?.as_ref().to_vec()),
            Inner::EdDsa(kp) => Ok(kp.sign(msg).as_ref().to_vec()),
        }
    }
}
