//! Every bound on what a caller may send, in one place. The edge (gRPC
//! conversions, the HTTP handlers, the server's codec and connection
//! settings) checks these before anything is decided or written; the
//! "Limits" table of `docs/guides/api.md` lists the same values ([`ALL`],
//! tested).

use std::time::Duration;

/// Longest intent, in bytes (tab and newline allowed, no other control
/// characters).
pub const MAX_INTENT_BYTES: usize = 4096;
/// Most context entries a task may carry, and most keys one
/// `UpdateTaskContext` may set or remove.
pub const MAX_CONTEXT_ENTRIES: usize = 64;
/// Longest context key, in bytes (`A-Z a-z 0-9 _ . -`).
pub const MAX_CONTEXT_KEY_BYTES: usize = 64;
/// Longest context value, in bytes (no control characters).
pub const MAX_CONTEXT_VALUE_BYTES: usize = 1024;
/// Most audiences in one envelope.
pub const MAX_AUDIENCES: usize = 16;
/// Most scopes in one envelope or request.
pub const MAX_SCOPES: usize = 64;
/// Longest audience, in bytes (printable ASCII, no spaces).
pub const MAX_AUDIENCE_BYTES: usize = 256;
/// Longest scope, in bytes (an RFC 6749 scope-token).
pub const MAX_SCOPE_BYTES: usize = 128;
/// Longest SPIFFE ID, in bytes (the SPIFFE-ID standard's limit).
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;
/// Longest operator note, denial reason or lock reason, in bytes (no
/// control characters).
pub const MAX_NOTE_BYTES: usize = 512;
/// Largest CSR, PEM or DER, in bytes.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Longest lifetime a request may ask for; more is a client bug, not a
/// request to clamp.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Longest single `WaitApproval`.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Largest page of a listing (0 asks for [`DEFAULT_PAGE_SIZE`]).
pub const MAX_PAGE_SIZE: u32 = 1000;
/// The page size when a listing asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Most records `ReadAudit` may start back from (`last`).
pub const MAX_AUDIT_LAST: u32 = 100_000;
/// Longest audit cursor, in bytes.
pub const MAX_AUDIT_CURSOR_BYTES: usize = 64;
/// Largest gRPC request message, in bytes: the biggest valid `StartTask`
/// (a 4 KiB intent, 64 context entries of 1 KiB) fits with room to spare.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Largest header block (gRPC metadata, HTTP headers), in bytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest HTTP request body (the `/introspect` form), in bytes.
pub const MAX_FORM_BYTES: usize = 16 * 1024;
/// Longest token `/introspect` considers; anything longer is not one of
/// Mayfly's and is answered `{"active": false}`.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Most concurrent requests (HTTP/2 streams) on one connection.
pub const MAX_STREAMS: u32 = 128;

/// One bound, for the documentation.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// What it bounds, as the API guide's table names it.
    pub what: &'static str,
    /// The bound, as the API guide's table shows it.
    pub value: &'static str,
}

/// Every bound above, as the API guide's "Limits" table lists it.
pub const ALL: &[Limit] = &[
    Limit {
        what: "`intent`",
        value: "4096 bytes",
    },
    Limit {
        what: "`context` entries; `UpdateTaskContext` `set`, `remove`",
        value: "64 each",
    },
    Limit {
        what: "context key",
        value: "64 bytes",
    },
    Limit {
        what: "context value",
        value: "1024 bytes",
    },
    Limit {
        what: "`audiences` per envelope",
        value: "16",
    },
    Limit {
        what: "`scopes` per envelope or request",
        value: "64",
    },
    Limit {
        what: "audience",
        value: "256 bytes",
    },
    Limit {
        what: "scope",
        value: "128 bytes",
    },
    Limit {
        what: "SPIFFE ID (`agent_id`, `delegate_id`, certificate URI SAN)",
        value: "2048 bytes",
    },
    Limit {
        what: "`note`, `reason`",
        value: "512 bytes",
    },
    Limit {
        what: "`csr`",
        value: "16384 bytes",
    },
    Limit {
        what: "`ttl_seconds`",
        value: "366 days",
    },
    Limit {
        what: "`wait_seconds`",
        value: "60",
    },
    Limit {
        what: "`page_size`",
        value: "1000",
    },
    Limit {
        what: "`ReadAudit` `last`",
        value: "100000",
    },
    Limit {
        what: "`ReadAudit` `after_cursor`",
        value: "64 bytes",
    },
    Limit {
        what: "gRPC request message",
        value: "262144 bytes",
    },
    Limit {
        what: "header block (gRPC metadata, HTTP headers)",
        value: "16384 bytes",
    },
    Limit {
        what: "HTTP request body",
        value: "16384 bytes",
    },
    Limit {
        what: "`/introspect` `token`",
        value: "8192 bytes",
    },
    Limit {
        what: "concurrent requests per connection",
        value: "128",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The table says what the constants are.
    #[test]
    fn the_table_matches_the_constants() {
        let shown = |i: usize| ALL[i].value;
        assert_eq!(shown(0), format!("{MAX_INTENT_BYTES} bytes"));
        assert_eq!(shown(1), format!("{MAX_CONTEXT_ENTRIES} each"));
        assert_eq!(shown(2), format!("{MAX_CONTEXT_KEY_BYTES} bytes"));
        assert_eq!(shown(3), format!("{MAX_CONTEXT_VALUE_BYTES} bytes"));
        assert_eq!(shown(4), MAX_AUDIENCES.to_string());
        assert_eq!(shown(5), MAX_SCOPES.to_string());
        assert_eq!(shown(6), format!("{MAX_AUDIENCE_BYTES} bytes"));
        assert_eq!(shown(7), format!("{MAX_SCOPE_BYTES} bytes"));
        assert_eq!(shown(8), format!("{MAX_SPIFFE_ID_BYTES} bytes"));
        assert_eq!(shown(9), format!("{MAX_NOTE_BYTES} bytes"));
        assert_eq!(shown(10), format!("{MAX_CSR_BYTES} bytes"));
        assert_eq!(shown(11), format!("{} days", MAX_TTL.as_secs() / 86_400));
        assert_eq!(shown(12), MAX_WAIT.as_secs().to_string());
        assert_eq!(shown(13), MAX_PAGE_SIZE.to_string());
        assert_eq!(shown(14), MAX_AUDIT_LAST.to_string());
        assert_eq!(shown(15), format!("{MAX_AUDIT_CURSOR_BYTES} bytes"));
        assert_eq!(shown(16), format!("{MAX_MESSAGE_BYTES} bytes"));
        assert_eq!(shown(17), format!("{MAX_HEADER_BYTES} bytes"));
        assert_eq!(shown(18), format!("{MAX_FORM_BYTES} bytes"));
        assert_eq!(shown(19), format!("{MAX_TOKEN_BYTES} bytes"));
        assert_eq!(shown(20), MAX_STREAMS.to_string());
        assert_eq!(ALL.len(), 21);
    }

    /// The API guide lists every bound with its value.
    #[test]
    fn the_api_guide_lists_every_bound() {
        let guide = include_str!("../../../docs/guides/api.md");
        for l in ALL {
            let row = format!("| {} | {} |", l.what, l.value);
            assert!(
                guide.contains(&row),
                "docs/guides/api.md lacks the row {row:?}"
            );
        }
    }
}
