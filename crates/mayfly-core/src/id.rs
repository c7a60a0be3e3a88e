//! Random identifiers for tasks and leases: 128 bits from the system CSPRNG,
//! base64url without padding (22 characters), so they are URL-safe and valid
//! as a SPIFFE path segment.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};

use crate::newtype::validated_string;

/// Length in characters of an encoded id (16 bytes, base64url, no padding).
const ID_LEN: usize = 22;

/// Why a string is not a task or lease id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid id: expected 22 base64url characters (A-Z a-z 0-9 - _)")]
pub struct IdError;

/// 16 random bytes, base64url. Panics only if the OS has no randomness, in
/// which case issuing anything would be unsafe.
///
/// An id never starts with `-`, so command lines (ours, shells' tools) never
/// take one for an option. The first character is drawn again in the 1 case
/// of 64 where it would be; the id keeps over 127.9 bits of randomness.
pub(crate) fn random_id() -> String {
    const DASH: u8 = 62; // '-' in the base64url alphabet
    let rng = SystemRandom::new();
    let mut bytes = [0u8; 16];
    loop {
        #[allow(clippy::expect_used)]
        rng.fill(&mut bytes)
            .expect("the system random number generator failed");
        if bytes[0] >> 2 != DASH {
            return URL_SAFE_NO_PAD.encode(bytes);
        }
    }
}

pub(crate) fn check_id(s: &str) -> Result<(), IdError> {
    // The last character of 16 bytes in base64 carries only 2 data bits, so a
    // canonical encoding must decode and re-encode to itself.
    if s.len() != ID_LEN
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(IdError);
    }
    match URL_SAFE_NO_PAD.decode(s) {
        Ok(bytes) if bytes.len() == 16 => Ok(()),
        _ => Err(IdError),
    }
}

validated_string!(
    /// Identifies a task. A task is also a lease (of kind `task`) whose lease
    /// id is the task id.
    TaskId,
    check_id,
    IdError
);
validated_string!(
    /// Identifies a lease; for a JWT it is the token's `jti`.
    LeaseId,
    check_id,
    IdError
);

validated_string!(
    /// Identifies one tool call a gateway was told to forward: its
    /// decision and, later, its outcome in the trail.
    CallId,
    check_id,
    IdError
);

impl CallId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(random_id())
    }
}

impl TaskId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(random_id())
    }

    /// The id of the task's own lease.
    pub fn lease_id(&self) -> LeaseId {
        LeaseId(self.0.clone())
    }
}

impl LeaseId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(random_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_round_trip_and_differ() {
        let a = TaskId::generate();
        let b = TaskId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 22);
        assert_eq!(TaskId::new(a.as_str()).unwrap(), a);
        assert_eq!(a.lease_id().as_str(), a.as_str());
    }

    #[test]
    fn generated_ids_never_look_like_an_option() {
        // 1 in 64 would start with '-' without the redraw: 10,000 draws
        // would all but surely show one.
        for _ in 0..10_000 {
            assert!(!random_id().starts_with('-'));
        }
        // Ids that do start with '-' are still valid ids.
        assert!(LeaseId::new("-AAAAAAAAAAAAAAAAAAAAA").is_ok());
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "short",
            "AAAAAAAAAAAAAAAAAAAAAAA", // 23 chars
            "AAAAAAAAAAAAAAAAAAAA+A",  // not url-safe
            "AAAAAAAAAAAAAAAAAAAA A",  // space
            "AAAAAAAAAAAAAAAAAAAAAB",  // non-canonical trailing bits
            "ÄAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(LeaseId::new(bad), Err(IdError), "{bad:?}");
        }
        assert!(LeaseId::new("AAAAAAAAAAAAAAAAAAAAAA").is_ok());
    }
}
