//! Signing-key rotation on two replicas sharing Redis and a key directory:
//! the next key is in every replica's JWKS before it signs, both replicas
//! switch at the same second, a validator that caches the JWKS and
//! refetches on an unknown `kid` (as stock ones do) never fails a token,
//! and the old `kid` leaves the JWKS only after its last token expired.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mayfly_broker::issuer::SigningKey;
use mayfly_broker::issuer::scheduled_path;
use mayfly_testkit::{RedisServer, TestBroker, https_get};
use serde_json::Value;

use crate::common::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn jwks(broker: &TestBroker) -> JwkSet {
    let (status, body) = https_get(
        &format!("{}/.well-known/jwks.json", broker.http_url()),
        &broker.bundle_pem(),
    )
    .await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

fn kids(set: &JwkSet) -> Vec<String> {
    set.keys
        .iter()
        .filter_map(|k| k.common.key_id.clone())
        .collect()
}

/// A validator as a resource server runs one: the JWKS cached, fetched
/// again only for a `kid` it does not know.
struct CachingValidator {
    keys: HashMap<String, DecodingKey>,
    fetches: usize,
}

impl CachingValidator {
    async fn fetch(&mut self, broker: &TestBroker) {
        self.fetches += 1;
        for jwk in jwks(broker).await.keys {
            let kid = jwk.common.key_id.clone().unwrap();
            self.keys.insert(kid, DecodingKey::from_jwk(&jwk).unwrap());
        }
    }

    async fn validate(&mut self, broker: &TestBroker, token: &str) -> Result<Value, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let kid = header.kid.ok_or("no kid")?;
        if !self.keys.contains_key(&kid) {
            self.fetch(broker).await;
        }
        let key = self
            .keys
            .get(&kid)
            .ok_or(format!("kid {kid} not in the JWKS"))?;
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[API]);
        v.set_issuer(&[broker.issuer()]);
        v.leeway = 0;
        jsonwebtoken::decode::<Value>(token, key, &v)
            .map(|t| t.claims)
            .map_err(|e| format!("{kid}: {e}"))
    }
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotates_on_both_replicas_without_a_failed_verification() {
    let redis = RedisServer::start();
    let a = TestBroker::start_on_redis_with(&redis.url(), |c| {
        c.tokens.key_reload_interval = Duration::from_millis(100);
        c.tokens.default_ttl = Duration::from_secs(2);
        c.tokens.max_ttl = Duration::from_secs(2);
        c.tokens.retire_grace = Duration::from_secs(1);
    })
    .await;
    let b = a.replica().await;
    let (agent_a, agent_b) = (a.agent().await, b.agent().await);
    let task = start(&agent_a).await;
    let old = kid_of(&issue(&agent_a, &task.task_id).await.token);
    assert_eq!(kids(&jwks(&a).await), std::slice::from_ref(&old));
    let mut validator = CachingValidator {
        keys: HashMap::new(),
        fetches: 0,
    };
    validator.fetch(&a).await;

    // The next key, signing 4 s from now (time enough, on a loaded
    // machine, to see it published first); both replicas publish it first.
    let switch = now() + 4;
    let path = scheduled_path(
        &a.config.data_dir,
        mayfly_broker::issuer::Algorithm::ES256,
        switch,
    );
    SigningKey::generate_file(&path, mayfly_broker::issuer::Algorithm::ES256).unwrap();
    let next = SigningKey::load(&path, mayfly_broker::issuer::Algorithm::ES256)
        .unwrap()
        .kid()
        .to_owned();

    // Load on both replicas through the switch and until the old key's
    // last token has expired; every token is validated when issued and
    // again while it lives.
    let retired_at = switch + 2 + 1;
    let mut live: Vec<(String, u64)> = Vec::new();
    let (mut by_old, mut by_next) = (0, 0);
    let mut failures = Vec::new();
    let mut published_next_before_switch = false;
    while now() <= retired_at + 1 {
        for agent in [&agent_a, &agent_b] {
            let before = now();
            let token = issue(agent, &task.task_id).await.token;
            let after = now();
            let kid = kid_of(&token);
            // Both replicas switch at the scheduled second, not before.
            if after < switch {
                assert_eq!(kid, old, "the next key signed before its time");
            }
            if before >= switch {
                assert_eq!(kid, next, "the old key signed after the switch");
            }
            if kid == old {
                by_old += 1;
            } else {
                assert_eq!(kid, next, "signed by a key nobody scheduled");
                by_next += 1;
            }
            let exp = claims_unverified(&token)["exp"].as_u64().unwrap();
            live.push((token, exp));
        }
        live.retain(|(_, exp)| *exp > now());
        for (token, _) in &live {
            if let Err(e) = validator.validate(&a, token).await {
                failures.push(e);
            }
        }
        // Both replicas' JWKS hold the old key while a token it signed
        // lives, and the next key before it signs.
        let t = now();
        for broker in [&a, &b] {
            let published = kids(&jwks(broker).await);
            if live.iter().any(|(tok, _)| kid_of(tok) == old) {
                assert!(
                    published.contains(&old),
                    "old kid gone while its tokens live"
                );
            }
            if t + 1 < switch && published.contains(&next) {
                published_next_before_switch = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        published_next_before_switch,
        "the next key was not published ahead"
    );
    assert!(by_old > 0 && by_next > 0, "old {by_old}, next {by_next}");
    // One fetch at start and one when the next kid first came.
    assert_eq!(validator.fetches, 2);
    // After its last token expired (and the grace), the old kid is gone
    // from both replicas.
    for broker in [&a, &b] {
        assert_eq!(kids(&jwks(broker).await), std::slice::from_ref(&next));
    }
}
