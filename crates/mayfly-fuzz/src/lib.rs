//! What each fuzz target does with its input: call one parser of untrusted
//! input and check what must hold of its answer. `fuzz/` wraps each in a
//! libFuzzer target (`cargo +nightly fuzz run <name>`); `tests/corpus.rs`
//! replays every input committed under `fuzz/seeds/`, `fuzz/corpus/` and
//! `fuzz/regressions/` through the same functions on every test run.
//!
//! A function panics only when an invariant fails (or the code under test
//! panics): that is what the fuzzer reports.

#![forbid(unsafe_code)]
#![allow(clippy::panic)]

use std::path::Path;
use std::sync::OnceLock;

use mayfly_broker::audit::{AuditRecord, ChainCheck};
use mayfly_broker::config::Config;
use mayfly_broker::issuer::parse_csr;
use mayfly_core::limits::MAX_CSR_BYTES;
use mayfly_core::{SpiffeId, SpiffeIdPattern, TrustDomain};
use mayfly_verify::{Verifier, VerifierConfig, parse_task_certificate};

/// One target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name: `fuzz/fuzz_targets/<name>.rs` and the
/// corpus directory `fuzz/corpus/<name>/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("csr", csr),
    ("token", token),
    ("spiffe_id", spiffe_id),
    ("config", config),
    ("audit_line", audit_line),
];

/// CSR intake: a request is accepted only within the size limit, and then
/// yields a public key; parsing is deterministic.
pub fn csr(data: &[u8]) {
    match parse_csr(data) {
        Ok(key) => {
            assert!(data.len() <= MAX_CSR_BYTES);
            assert!(!key.spki().is_empty());
            assert_eq!(parse_csr(data).ok(), Some(key));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The public half of a P-256 key made for this target (its private half
/// was thrown away after signing the seed tokens `fuzz/seeds/token/valid` and `bound`).
const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"yKRDgtOQf_0hIaXq9DvYckesUE9h6UwQZTKs9vUZB30","y":"QEJFGEDmSGJRFoCGyRtuGvgIjEySUPjC_XIv4RtBy34","kid":"fuzz","alg":"ES256","use":"sig"}]}"#;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let config = VerifierConfig::new(
            "https://fuzz.example",
            "https://api.example.com",
            Vec::new(),
        );
        match Verifier::offline(config, JWKS.as_bytes()) {
            Ok(v) => v,
            Err(e) => panic!("the target's JWKS loads: {e}"),
        }
    })
}

/// Token verification (mayfly-verify) and task certificates' form: an
/// accepted token is for this audience and names a valid agent and task;
/// a token that is bound to a certificate is refused without it.
pub fn token(data: &[u8]) {
    let v = verifier();
    let text = String::from_utf8_lossy(data);
    let plain = v.verify_cached(&text, None);
    let with_cert = v.verify_cached(&text, Some(data));
    if let Ok(t) = &plain {
        assert_eq!(t.audience, "https://api.example.com");
        assert!(t.bound_to.is_none(), "a bound token needs its certificate");
        assert_eq!(t.agent.as_str(), t.agent.to_string());
    }
    if let Ok(t) = &with_cert {
        assert_eq!(t.bound_to.is_some(), plain.is_err());
    }
    if let Ok(id) = parse_task_certificate(data) {
        assert!(id.spiffe_id.is_task_bound());
        assert!(id.spiffe_id.as_str().starts_with(id.agent.as_str()));
        assert!(id.spiffe_id.as_str().ends_with(id.task_id.as_str()));
    }
}

/// SPIFFE ID parsing: what parses prints back the same, its ancestors are
/// segment prefixes that parse as trust domains or IDs, and patterns
/// round-trip.
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::new(s) {
        assert_eq!(id.as_str(), s);
        assert_eq!(SpiffeId::new(&id.to_string()).ok(), Some(id.clone()));
        assert!(id.is_member_of(&id.trust_domain()));
        assert_eq!(
            id.is_task_bound(),
            id.segments().any(|seg| seg == mayfly_core::TASK_SEGMENT)
        );
        let ancestors: Vec<&str> = id.ancestors().collect();
        assert_eq!(ancestors.len(), id.segments().count());
        assert_eq!(ancestors[0], format!("spiffe://{}", id.trust_domain_name()));
        for a in &ancestors[1..] {
            let parent = SpiffeId::new(a).unwrap_or_else(|e| panic!("{a}: {e}"));
            assert!(id.as_str().starts_with(&format!("{parent}/")));
        }
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert_eq!(TrustDomain::new(td.as_str()).ok(), Some(td));
    }
    if let Ok(p) = SpiffeIdPattern::new(s) {
        assert_eq!(SpiffeIdPattern::new(&p.to_string()).ok(), Some(p.clone()));
        if let Ok(id) = SpiffeId::new(s) {
            assert!(p.matches(&id), "an exact pattern matches its own ID");
        }
    }
}

/// The config parser: any text is parsed or refused with a message; a
/// parsed config passes its own checks and resolves every path.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("/etc/mayfly")) {
        Ok(c) => {
            assert!(c.data_dir.is_absolute());
            assert!(c.policy.dir.is_absolute());
            assert!(c.connections.max_unauthenticated < c.connections.max);
            assert!((1..=128).contains(&c.connections.ipv6_source_prefix));
            assert!(c.tokens.default_ttl <= c.tokens.max_ttl);
            let _ = c.issuer();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The audit line parser: a line is a record or refused; a record
/// serialises back to a record equal to it; the chain check accepts a
/// first record wherever it starts, except that seq 1 must follow genesis
/// (64 zeros), as it must from genesis.
pub fn audit_line(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = serde_json::from_str::<AuditRecord>(line);
    let mut anywhere = ChainCheck::from_first_record();
    let mut genesis = ChainCheck::from_genesis();
    let (a, g) = (anywhere.line(line, 1), genesis.line(line, 1));
    match parsed {
        Ok(r) => {
            let again: AuditRecord = serde_json::from_str(
                &serde_json::to_string(&r).unwrap_or_else(|e| panic!("reserialise: {e}")),
            )
            .unwrap_or_else(|e| panic!("reparse: {e}"));
            assert_eq!(again, r);
            let after_genesis = r.seq == 1 && r.prev == mayfly_broker::audit::GENESIS;
            assert_eq!(a.is_ok(), r.seq > 1 || after_genesis);
            assert_eq!(g.is_ok(), after_genesis);
        }
        Err(_) => assert!(a.is_err() && g.is_err()),
    }
}
