//! Property tests for the parsers that take outside input: whatever the
//! input, a parser either refuses it or returns a value that prints back to
//! exactly that input and satisfies the type's rules.

#![allow(clippy::unwrap_used)]

use mayfly_core::{
    Audience, Intent, LeaseId, Scope, SpiffeId, SpiffeIdPattern, TaskId, TrustDomain,
};
use proptest::prelude::*;

/// Strings near the SPIFFE grammar, so both outcomes are exercised.
fn spiffe_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "spiffe://[a-z0-9._-]{1,12}(/[A-Za-z0-9._-]{1,8}){0,4}",
        "spiffe://[a-zA-Z0-9.:@_-]{0,12}(/[A-Za-z0-9.%?#_ -]{0,8}){0,4}/?",
        "[a-z]{0,8}://[a-z.]{0,8}/[a-z/]{0,8}",
        any::<String>(),
    ]
}

proptest! {
    #[test]
    fn spiffe_id_round_trips_or_refuses(s in spiffe_like()) {
        if let Ok(id) = SpiffeId::new(&s) {
            prop_assert_eq!(id.as_str(), s.as_str());
            prop_assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id.clone());
            prop_assert_eq!(
                format!("spiffe://{}{}", id.trust_domain_name(), id.path()),
                s.clone()
            );
            prop_assert!(id.is_member_of(&id.trust_domain()));
            prop_assert!(TrustDomain::new(id.trust_domain_name()).is_ok());
            prop_assert!(id.path().starts_with('/') && !id.path().ends_with('/'));
            prop_assert!(!id.path().contains("//"));
            for seg in id.path()[1..].split('/') {
                prop_assert!(seg != "." && seg != "..");
                prop_assert!(seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
            }
        }
    }

    #[test]
    fn well_formed_ids_always_parse(
        td in "[a-z0-9][a-z0-9._-]{0,20}",
        segs in proptest::collection::vec("[A-Za-z0-9_-][A-Za-z0-9._-]{0,10}", 1..5),
    ) {
        let s = format!("spiffe://{td}/{}", segs.join("/"));
        prop_assume!(!segs.iter().any(|g| g == "." || g == ".."));
        prop_assert!(SpiffeId::new(&s).is_ok(), "{}", s);
        let prefix = SpiffeIdPattern::new(&format!("spiffe://{td}/*")).unwrap();
        prop_assert!(prefix.matches(&SpiffeId::new(&s).unwrap()));
    }

    #[test]
    fn ids_are_canonical_base64url_of_16_bytes(s in prop_oneof!["[A-Za-z0-9_-]{20,24}", any::<String>()]) {
        if let Ok(id) = TaskId::new(&s) {
            prop_assert_eq!(id.as_str().len(), 22);
            let lease = LeaseId::new(&s).unwrap();
            prop_assert_eq!(lease.as_str(), s.as_str());
        }
    }

    #[test]
    fn scopes_and_audiences_are_printable_tokens(s in any::<String>()) {
        if let Ok(scope) = Scope::new(&s) {
            prop_assert!(!scope.as_str().is_empty());
            prop_assert!(scope.as_str().bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\'));
        }
        if let Ok(aud) = Audience::new(&s) {
            prop_assert!(aud.as_str().bytes().all(|b| b.is_ascii_graphic()));
        }
        if let Ok(intent) = Intent::new(&s) {
            prop_assert!(!intent.as_str().trim().is_empty());
            prop_assert!(intent.as_str().len() <= 4096);
        }
    }
}
