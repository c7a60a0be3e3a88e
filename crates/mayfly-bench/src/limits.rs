//! The limits a run is measured against, on this machine in this run:
//! signing the same token (or certificate) in process on every core, the
//! store's raw write (embedded: one lease insert, fsynced; Redis: one
//! atomic pipeline writing what an issue writes), and both together. No
//! network, no gRPC, no policy: what the broker could do at best.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use mayfly_broker::issuer::Algorithm;
use mayfly_broker::issuer::{IssuingCa, JwtSigner, SigningKey, parse_csr, random_serial};
use mayfly_broker::store::{EmbeddedStore, LeaseStore};
use mayfly_core::{AccessTokenClaims, SpiffeId, Task, Timestamp};
use mayfly_testkit::contract::{agent, lease, task};

/// The token the broker signs for the `token` mix, near enough byte for
/// byte.
fn claims() -> AccessTokenClaims {
    AccessTokenClaims {
        iss: "https://localhost:8711".into(),
        sub: "spiffe://example.org/agent/demo".into(),
        aud: "https://api.example.com".into(),
        exp: 1_800_000_300,
        iat: 1_800_000_000,
        nbf: 1_800_000_000,
        jti: "p_mMsUbnboE9enWz_ooAFw".into(),
        client_id: "spiffe://example.org/agent/demo".into(),
        scope: Some("read:files".into()),
        task_id: "lbaPf1dJlLwnMXaf5bpjpA".into(),
        cnf: None,
        act: None,
        // As every token the broker signs carries one.
        status: Some(mayfly_core::status_list::status_claim(
            "https://localhost:8711",
            1 << 20,
        )),
    }
}

/// A signer with a fresh key of `alg`.
pub fn signer(alg: Algorithm) -> anyhow::Result<JwtSigner> {
    let rcgen_alg = match alg {
        Algorithm::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        Algorithm::EdDSA => &rcgen::PKCS_ED25519,
    };
    let der = rcgen::KeyPair::generate_for(rcgen_alg)?.serialize_der();
    let key = SigningKey::from_pkcs8(&der, alg)?;
    Ok(JwtSigner::new(key, Vec::new()))
}

/// Runs `op` on one thread per core for `d`; operations per second.
fn on_every_core(d: Duration, op: impl Fn() + Send + Sync + 'static) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            let (op, done) = (op.clone(), done.clone());
            std::thread::spawn(move || {
                while start.elapsed() < d {
                    op();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Token signatures per second on every core.
pub fn sign_rate(alg: Algorithm, d: Duration) -> anyhow::Result<f64> {
    let s = signer(alg)?;
    let c = claims();
    Ok(on_every_core(d, move || {
        let _ = s.sign(&c);
    }))
}

/// CSR checks plus certificate signatures per second on every core, with
/// the profile's issuing CA.
pub fn cert_rate(ca_cert: &Path, ca_key: &Path, d: Duration) -> anyhow::Result<f64> {
    let ca = IssuingCa::load(ca_cert, ca_key).context("the issuing CA, for the cert limit")?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .der()
        .to_vec();
    let id = SpiffeId::new("spiffe://example.org/agent/demo/task/AAAAAAAAAAAAAAAAAAAAAA")?;
    Ok(on_every_core(d, move || {
        let now = Timestamp::now();
        if let Ok(k) = parse_csr(&csr) {
            let _ = ca.sign_svid(
                &k,
                &id,
                now,
                now.plus(Duration::from_secs(600)),
                random_serial().0,
            );
        }
    }))
}

/// Where the raw writes go.
pub enum Target {
    /// A fresh embedded store in a directory on the broker's disk.
    Embedded {
        /// The store.
        store: Arc<dyn LeaseStore>,
        /// Its one task.
        task: Box<Task>,
        /// Removed when done.
        _dir: tempfile::TempDir,
    },
    /// A Redis: one MULTI/EXEC pipeline per write, of an issue's size.
    Redis {
        /// The connection.
        conn: redis::aio::MultiplexedConnection,
        /// The lease body written.
        body: Arc<Vec<u8>>,
    },
}

const REDIS_PREFIX: &str = "mayfly-bench-limit";

impl Target {
    /// A fresh embedded store under `dir`.
    pub async fn embedded(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let tmp = tempfile::tempdir_in(dir)
            .with_context(|| format!("a scratch store in {}", dir.display()))?;
        let store: Arc<dyn LeaseStore> =
            Arc::new(EmbeddedStore::open(&tmp.path().join("limit.redb"))?);
        let t = task(&agent("bench"), 24 * 3600);
        store.start_task(&t).await?;
        Ok(Self::Embedded {
            store,
            task: Box::new(t),
            _dir: tmp,
        })
    }

    /// The Redis at `url` (keys under `mayfly-bench-limit:`, expiring).
    pub async fn redis(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let conn = client.get_multiplexed_async_connection().await?;
        let t = task(&agent("bench"), 3600);
        let body = serde_json::to_vec(&lease(&t, 300))?;
        Ok(Self::Redis {
            conn,
            body: Arc::new(body),
        })
    }

    async fn write(&self, n: u64) -> anyhow::Result<()> {
        match self {
            Self::Embedded { store, task: t, .. } => {
                let l = lease(t, 3600);
                store.issue(&l, t.created_at).await?;
            }
            Self::Redis { conn, body } => {
                let key = format!("{REDIS_PREFIX}:lease:{n}");
                let mut c = conn.clone();
                let _: () = redis::pipe()
                    .atomic()
                    .hset_multiple(&key, &[("body", body.as_slice()), ("state", b"active")])
                    .pexpire(&key, 120_000)
                    .zadd(format!("{REDIS_PREFIX}:task"), &key, 0)
                    .zadd(format!("{REDIS_PREFIX}:all"), &key, 0)
                    .zadd(format!("{REDIS_PREFIX}:agent"), &key, 0)
                    .zadd(format!("{REDIS_PREFIX}:expiry"), &key, n)
                    .query_async(&mut c)
                    .await?;
            }
        }
        Ok(())
    }

    /// Removes what the Redis writes left.
    pub async fn clean(&self) {
        if let Self::Redis { conn, .. } = self {
            let mut c = conn.clone();
            let keys = ["task", "all", "agent", "expiry"].map(|k| format!("{REDIS_PREFIX}:{k}"));
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut c).await;
        }
    }
}

/// Writes per second with `concurrency` writers for `d`, each signing a
/// token first when `sign` is given.
pub async fn write_rate(
    target: Arc<Target>,
    sign: Option<Arc<JwtSigner>>,
    concurrency: usize,
    d: Duration,
) -> anyhow::Result<f64> {
    let (done, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let start = Instant::now();
    let claims = Arc::new(claims());
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (target, sign, done, stop, claims) = (
                target.clone(),
                sign.clone(),
                done.clone(),
                stop.clone(),
                claims.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(s) = &sign {
                        s.sign(&claims)?;
                    }
                    let n = done.fetch_add(1, Ordering::Relaxed);
                    target.write(n).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}
