//! Every input committed for the fuzz targets (`fuzz/seeds/<target>/`,
//! made by hand; `fuzz/corpus/<target>/`, grown by the fuzzer and kept
//! small with `cargo fuzz cmin`; and `fuzz/regressions/<target>/`, the
//! inputs that once found a bug) goes through its target on every test
//! run, so a regression is caught without a fuzzer.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::Path;

#[test]
fn every_committed_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    for (name, target) in mayfly_fuzz::TARGETS {
        let mut seen = 0;
        for kind in ["seeds", "corpus", "regressions"] {
            let dir = root.join(kind).join(name);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                // A fuzzer running beside the tests may remove entries.
                let Ok(data) = std::fs::read(&path) else {
                    continue;
                };
                if std::panic::catch_unwind(|| target(&data)).is_err() {
                    panic!("{name}: {} fails its target", path.display());
                }
                seen += 1;
            }
        }
        assert!(
            seen > 0,
            "{name}: no committed inputs under {}",
            root.display()
        );
    }
}

/// The token target's seed reaches past the signature (so the claim
/// checks are in the fuzzer's reach from the first input).
#[test]
fn the_token_seed_verifies_against_the_targets_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/token");
    let valid = std::fs::read_to_string(root.join("valid")).unwrap();
    let config = mayfly_verify::VerifierConfig::new(
        "https://fuzz.example",
        "https://api.example.com",
        Vec::new(),
    );
    let jwks = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"yKRDgtOQf_0hIaXq9DvYckesUE9h6UwQZTKs9vUZB30","y":"QEJFGEDmSGJRFoCGyRtuGvgIjEySUPjC_XIv4RtBy34","kid":"fuzz","alg":"ES256","use":"sig"}]}"#;
    let v = mayfly_verify::Verifier::offline(config, jwks.as_bytes()).unwrap();
    let t = v.verify_cached(valid.trim(), None).unwrap();
    assert_eq!(t.agent.as_str(), "spiffe://example.org/agent/demo");
    let bound = std::fs::read_to_string(root.join("bound")).unwrap();
    assert_eq!(
        v.verify_cached(bound.trim(), None),
        Err(mayfly_verify::VerifyError::CertificateRequired)
    );
}
