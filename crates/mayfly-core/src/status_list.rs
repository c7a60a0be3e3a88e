//! The Token Status List (draft-ietf-oauth-status-list): the `status`
//! claim a token carries, and the one-bit list a Status List Token holds.
//!
//! Every token names an index (`idx`) in one list (`uri`). Indexes are
//! allocated from a counter that only grows, so an index is never handed
//! out twice; list `n` holds indexes `n * INDEXES_PER_LIST` up to the next
//! list's first. Bit `i` of a list is bit `i % 8` (least significant
//! first) of byte `i / 8`: 1 (`INVALID`) once the token is revoked.

use std::io::{Read, Write};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// The header `typ` of a Status List Token.
pub const STATUS_LIST_TYPE: &str = "statuslist+jwt";

/// The media type a Status List Token is served as.
pub const STATUS_LIST_MEDIA_TYPE: &str = "application/statuslist+jwt";

/// Indexes per list: 2^20, a list of 128 KiB before compression.
pub const INDEXES_PER_LIST: u64 = 1 << 20;

/// The largest list a reader accepts, in bytes once inflated: a list
/// claiming more is refused before it is decompressed further.
pub const MAX_LIST_BYTES: usize = (INDEXES_PER_LIST / 8) as usize;

/// The `status` claim of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusClaim {
    /// Where the token's status is kept.
    pub status_list: StatusListRef,
}

/// A token's place in a status list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusListRef {
    /// The token's index in the list.
    pub idx: u64,
    /// The Status List Token's URI (its `sub`).
    pub uri: String,
}

/// The list an index belongs to.
pub fn list_of(idx: u64) -> u64 {
    idx / INDEXES_PER_LIST
}

/// The URI of list `n` of the broker at `issuer`.
pub fn list_uri(issuer: &str, n: u64) -> String {
    format!("{}/statuslists/{n}", issuer.trim_end_matches('/'))
}

/// The `status` claim of the token with index `idx`.
pub fn status_claim(issuer: &str, idx: u64) -> StatusClaim {
    StatusClaim {
        status_list: StatusListRef {
            idx,
            uri: list_uri(issuer, list_of(idx)),
        },
    }
}

/// The `status_list` claim of a Status List Token: one bit per token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusListClaim {
    /// Bits per token: always 1 here.
    pub bits: u8,
    /// The list, ZLIB-compressed, base64url without padding.
    pub lst: String,
}

/// Why a `status_list` claim could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatusListError {
    /// `bits` is not 1: this reader knows valid and revoked only.
    #[error("status list has {0} bits per token; only 1 is read")]
    Bits(u8),
    /// `lst` is not base64url.
    #[error("status list lst is not base64url")]
    Encoding,
    /// `lst` does not inflate as ZLIB.
    #[error("status list lst is not ZLIB data")]
    Compression,
    /// `lst` inflates to more than [`MAX_LIST_BYTES`].
    #[error("status list lst inflates to more than {MAX_LIST_BYTES} bytes")]
    TooLarge,
}

/// One list's bits, inflated.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusBits {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for StatusBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusBits")
            .field("bytes", &self.bytes.len())
            .field("set", &self.count())
            .finish()
    }
}

impl StatusBits {
    /// A full list ([`INDEXES_PER_LIST`] bits), every token valid.
    pub fn new() -> Self {
        Self {
            bytes: vec![0; MAX_LIST_BYTES],
        }
    }

    /// Marks the token at `idx` (an index of this list, taken modulo its
    /// size) revoked.
    pub fn set(&mut self, idx: u64) {
        let i = idx % INDEXES_PER_LIST;
        self.bytes[(i / 8) as usize] |= 1 << (i % 8);
    }

    /// Whether the token at `idx` (taken modulo the list's size) is
    /// revoked. An index beyond a shorter list is read as revoked: the
    /// list does not vouch for it.
    pub fn is_set(&self, idx: u64) -> bool {
        let i = idx % INDEXES_PER_LIST;
        self.bytes
            .get((i / 8) as usize)
            .is_none_or(|b| b & (1 << (i % 8)) != 0)
    }

    /// How many tokens are marked.
    pub fn count(&self) -> u64 {
        self.bytes.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// The claim: ZLIB at the best compression, base64url.
    pub fn claim(&self) -> StatusListClaim {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        // Writing to a Vec cannot fail.
        let compressed = z
            .write_all(&self.bytes)
            .and_then(|()| z.finish())
            .unwrap_or_default();
        StatusListClaim {
            bits: 1,
            lst: URL_SAFE_NO_PAD.encode(compressed),
        }
    }

    /// Reads a claim, refusing a list of other than one bit per token or
    /// one that inflates beyond [`MAX_LIST_BYTES`].
    pub fn from_claim(claim: &StatusListClaim) -> Result<Self, StatusListError> {
        if claim.bits != 1 {
            return Err(StatusListError::Bits(claim.bits));
        }
        let compressed = URL_SAFE_NO_PAD
            .decode(&claim.lst)
            .map_err(|_| StatusListError::Encoding)?;
        let mut bytes = Vec::new();
        let read = flate2::read::ZlibDecoder::new(compressed.as_slice())
            .take(MAX_LIST_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|_| StatusListError::Compression)?;
        if read > MAX_LIST_BYTES {
            return Err(StatusListError::TooLarge);
        }
        Ok(Self { bytes })
    }
}

impl Default for StatusBits {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_least_significant_first() {
        // The draft's example: statuses 1,0,0,1,1,1,0,1 | 1,1,0,0,0,1,0,1
        // are bytes 0xB9 0xA3.
        let mut bits = StatusBits::new();
        for i in [0, 3, 4, 5, 7, 8, 9, 13, 15] {
            bits.set(i);
        }
        assert_eq!(&bits.bytes[..2], &[0xB9, 0xA3]);
        assert!(bits.is_set(13) && !bits.is_set(14));
        assert_eq!(bits.count(), 9);
    }

    #[test]
    fn claim_round_trips_and_indexes_wrap_per_list() {
        let mut bits = StatusBits::new();
        bits.set(INDEXES_PER_LIST + 5);
        let back = StatusBits::from_claim(&bits.claim()).unwrap();
        assert!(back.is_set(5));
        assert!(!back.is_set(4));
        assert_eq!(back.count(), 1);
        // A list of a million valid tokens is small once compressed.
        assert!(StatusBits::new().claim().lst.len() < 1000);
    }

    #[test]
    fn hostile_claims_are_refused() {
        let bits = StatusBits::new().claim();
        let two = StatusListClaim { bits: 2, ..bits };
        assert_eq!(StatusBits::from_claim(&two), Err(StatusListError::Bits(2)));
        let bad = StatusListClaim {
            bits: 1,
            lst: "***".into(),
        };
        assert_eq!(StatusBits::from_claim(&bad), Err(StatusListError::Encoding));
        let raw = StatusListClaim {
            bits: 1,
            lst: URL_SAFE_NO_PAD.encode(b"not zlib"),
        };
        assert_eq!(
            StatusBits::from_claim(&raw),
            Err(StatusListError::Compression)
        );
        // A bomb: twice the largest list, all zeros, compresses to little.
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0; 2 * MAX_LIST_BYTES]).unwrap();
        let bomb = StatusListClaim {
            bits: 1,
            lst: URL_SAFE_NO_PAD.encode(z.finish().unwrap()),
        };
        assert_eq!(
            StatusBits::from_claim(&bomb),
            Err(StatusListError::TooLarge)
        );
        // An index beyond a short list is not vouched for.
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&[0]).unwrap();
        let short = StatusBits::from_claim(&StatusListClaim {
            bits: 1,
            lst: URL_SAFE_NO_PAD.encode(z.finish().unwrap()),
        })
        .unwrap();
        assert!(!short.is_set(7) && short.is_set(8));
    }
}
