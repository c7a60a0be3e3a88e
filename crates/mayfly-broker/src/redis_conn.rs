//! The connection to Redis: a multiplexed, self-reconnecting
//! `ConnectionManager` to one server, or to the primary a set of Sentinels
//! names (re-resolved after a connection failure or a `READONLY` reply, i.e.
//! after a failover). Every call is bounded in time, so an outage turns into
//! [`Unreachable`] quickly instead of a hang. The lease store and the
//! audit trail's Redis sink share this module (and, when both are in one
//! Redis, one connection).
//!
//! Recovery costs no request once Redis is back:
//! - a connection that has had no successful reply for [`PROBE_AFTER`], or
//!   whose last call failed, is checked with a `PING` before it carries a
//!   request; a dead one (Redis restarted or failed over while it sat idle)
//!   is replaced and checked again, so the request goes out on a live
//!   connection;
//! - [`RedisConn::run_idempotent`] sends a request again, once, when it
//!   meets a connection that died under it; callers use it only for reads
//!   and for writes whose repetition is harmless or fenced (a script that
//!   recognises its own earlier success);
//! - the check is `ROLE`, so a primary demoted to a replica by a failover
//!   is noticed before a write meets its `READONLY`; a `READONLY` reply
//!   still makes the next call re-resolve the primary.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cause::Cause;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, RedisError, TlsCertificates, TlsMode};
use tokio::sync::{Mutex, RwLock};

/// Redis could not be reached, or failed a call at the connection level;
/// the message says how (never with credentials).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(#[source] pub Cause);

/// Which way [`RedisConn::stream_range`] reads a stream.
#[derive(Debug, Clone, Copy)]
pub enum Towards {
    /// Oldest first (`XRANGE`).
    Newer,
    /// Newest first (`XREVRANGE`).
    Older,
}

/// One call to Redis may take this long before it counts as an outage.
const CALL_TIMEOUT: Duration = Duration::from_millis(1500);
/// A connection attempt may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
/// A reply may take this long on an established connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(1000);
/// A connection without a successful reply for this long is checked before
/// it carries a request.
pub const PROBE_AFTER: Duration = Duration::from_secs(1);

/// Where Redis is.
#[derive(Clone)]
pub enum RedisTarget {
    /// One server: `redis://` or `rediss://` URL (credentials may be in it).
    Url {
        /// The URL.
        url: String,
        /// PEM of a private CA for `rediss://`.
        ca_pem: Option<Vec<u8>>,
    },
    /// The primary of `master_name`, as the Sentinels at `sentinels` report it.
    Sentinel {
        /// `redis://host:port` of each Sentinel, or `rediss://` (TLS to the
        /// Sentinels and to the data nodes); a password in the URL is the
        /// Sentinels'.
        sentinels: Vec<String>,
        /// The monitored primary's name.
        master_name: String,
        /// Password of the data nodes, if any.
        password: Option<String>,
        /// PEM of a private CA for the `rediss://` Sentinels and data nodes.
        ca_pem: Option<Vec<u8>>,
    },
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may carry a password: show only host and port.
        match self {
            Self::Url { url, .. } => write!(f, "Url({})", redact(url)),
            Self::Sentinel {
                sentinels,
                master_name,
                ..
            } => write!(
                f,
                "Sentinel({master_name} via {} sentinels)",
                sentinels.len()
            ),
        }
    }
}

impl RedisTarget {
    /// A URL without its credentials, for messages and logs.
    pub fn redacted(url: &str) -> String {
        redact(url)
    }
}

/// `redis://user:secret@host:6379/0` → `redis://host:6379/0`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(200))
}

fn unavailable(e: &RedisError) -> Unreachable {
    Unreachable(Cause::context("redis", e.clone()))
}

/// Whether `e` says the connection (not the request) failed: the request
/// may not have reached Redis, and a new connection may succeed.
fn connection_failed(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// Whether `e` is a write refused by a replica: not executed, so safe to
/// send again once the primary is found.
fn read_only(e: &RedisError) -> bool {
    e.to_string().contains("READONLY")
}

/// How a call ended, for the connection's next caller.
#[derive(Debug)]
struct Health {
    /// Time base of `last_ok_ms`.
    since: Instant,
    /// When a reply last came back, in ms after `since`; 0 = never.
    last_ok_ms: AtomicU64,
    /// The last call failed on the connection: check it before the next.
    suspect: AtomicBool,
}

impl Health {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn ok(&self) {
        self.last_ok_ms.store(self.now_ms(), Ordering::Release);
        self.suspect.store(false, Ordering::Release);
    }

    fn failed(&self) {
        self.suspect.store(true, Ordering::Release);
    }

    fn needs_probe(&self) -> bool {
        let last = self.last_ok_ms.load(Ordering::Acquire);
        self.suspect.load(Ordering::Acquire)
            || last == 0
            || self.now_ms().saturating_sub(last) >= PROBE_AFTER.as_millis() as u64
    }
}

/// One failed attempt: the error, and whether sending again may help.
struct Failure {
    error: Unreachable,
    /// The connection failed (not the request), or a replica refused it.
    retry: bool,
}

/// A shared, reconnecting connection.
pub struct RedisConn {
    target: RedisTarget,
    /// For Sentinel: resolves the current primary.
    sentinel: Option<Mutex<SentinelClient>>,
    /// The live manager; `None` until first use or after a failover.
    manager: RwLock<Option<ConnectionManager>>,
    /// Whether the connection is known to be good right now.
    health: Health,
}

/// A Sentinel client. With `rediss://` Sentinels, the Sentinels and the
/// data nodes they name are both reached over TLS, trusting `ca_pem` (or
/// the system's roots); the Sentinels' password is their URLs', the data
/// nodes' `password`.
fn sentinel_client(
    sentinels: &[String],
    master_name: &str,
    password: Option<&str>,
    ca_pem: &Option<Vec<u8>>,
) -> Result<SentinelClient, RedisError> {
    use redis::IntoConnectionInfo;
    let infos = sentinels
        .iter()
        .map(|s| s.as_str().into_connection_info())
        .collect::<Result<Vec<_>, _>>()?;
    let tls = sentinels.iter().any(|s| s.starts_with("rediss://"));
    let sentinel_password = infos
        .iter()
        .find_map(|i| i.redis_settings().password().map(str::to_owned));
    let mut b = SentinelClientBuilder::new(
        infos.iter().map(|i| i.addr().clone()),
        master_name,
        SentinelServerType::Master,
    )?;
    if let Some(p) = sentinel_password {
        b = b.set_client_to_sentinel_password(p);
    }
    if let Some(p) = password {
        b = b.set_client_to_redis_password(p);
    }
    if tls {
        b = b
            .set_client_to_sentinel_tls_mode(TlsMode::Secure)
            .set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(ca) = ca_pem {
            let certs = || TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            };
            b = b
                .set_client_to_sentinel_certificates(certs())
                .set_client_to_redis_certificates(certs());
        }
    }
    b.build()
}

impl RedisConn {
    /// Prepares a connection; nothing is dialled until the first call.
    pub fn new(target: RedisTarget) -> Result<Self, Unreachable> {
        let sentinel = match &target {
            RedisTarget::Url { .. } => None,
            RedisTarget::Sentinel {
                sentinels,
                master_name,
                password,
                ca_pem,
            } => {
                let client = sentinel_client(sentinels, master_name, password.as_deref(), ca_pem)
                    .map_err(|e| unavailable(&e))?;
                Some(Mutex::new(client))
            }
        };
        Ok(Self {
            target,
            sentinel,
            manager: RwLock::new(None),
            health: Health {
                since: Instant::now(),
                last_ok_ms: AtomicU64::new(0),
                suspect: AtomicBool::new(false),
            },
        })
    }

    /// For logs: where, without secrets.
    pub fn describe(&self) -> String {
        format!("{:?}", self.target)
    }

    async fn client(&self) -> Result<Client, Unreachable> {
        match (&self.target, &self.sentinel) {
            (
                RedisTarget::Url {
                    url,
                    ca_pem: Some(ca),
                },
                _,
            ) => Client::build_with_tls(
                url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )
            .map_err(|e| unavailable(&e)),
            (RedisTarget::Url { url, ca_pem: None }, _) => {
                Client::open(url.as_str()).map_err(|e| unavailable(&e))
            }
            (RedisTarget::Sentinel { .. }, Some(sentinel)) => {
                let mut s = sentinel.lock().await;
                tokio::time::timeout(CALL_TIMEOUT, s.async_get_client())
                    .await
                    .map_err(|_| Unreachable(Cause::msg("sentinels did not answer in time")))?
                    .map_err(|e| unavailable(&e))
            }
            (RedisTarget::Sentinel { .. }, None) => {
                Err(Unreachable(Cause::msg("sentinel client missing")))
            }
        }
    }

    async fn manager(&self) -> Result<ConnectionManager, Unreachable> {
        if let Some(m) = self.manager.read().await.as_ref() {
            return Ok(m.clone());
        }
        let mut slot = self.manager.write().await;
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let client = self.client().await?;
        let m = ConnectionManager::new_lazy_with_config(client, manager_config())
            .map_err(|e| unavailable(&e))?;
        *slot = Some(m.clone());
        Ok(m)
    }

    /// A manager whose connection answered lately, or answers a `PING`
    /// now (see the module docs).
    async fn ready(&self) -> Result<ConnectionManager, Unreachable> {
        let manager = self.manager().await?;
        if !self.health.needs_probe() {
            return Ok(manager);
        }
        // A dead connection fails the first PING and is replaced by the
        // manager (or, with Sentinel, re-resolved); the second goes out on
        // the new one.
        let mut manager = manager;
        for first in [true, false] {
            // ROLE, not PING: a primary demoted to a replica still answers
            // PING, but would refuse every write.
            let role = |mut c: ConnectionManager| async move {
                redis::cmd("ROLE").query_async::<redis::Value>(&mut c).await
            };
            match self.attempt(manager, role).await {
                Ok(redis::Value::Array(v)) if matches!(v.first(), Some(redis::Value::BulkString(r)) if r == b"master") =>
                {
                    return self.manager().await;
                }
                Ok(_) => {
                    self.health.failed();
                    self.forget_primary().await;
                    if !first {
                        return Err(Unreachable(Cause::msg(
                            "redis is a replica, not the primary; waiting for a failover",
                        )));
                    }
                    manager = self.manager().await?;
                }
                Err(f) if first && f.retry => {
                    tracing::debug!(error = %f.error, "redis connection was dead; reconnecting");
                    manager = self.manager().await?;
                }
                Err(f) => return Err(f.error),
            }
        }
        Err(Unreachable(Cause::msg("redis did not answer")))
    }

    /// One try of `f`, bounded in time, with what the failure means.
    async fn attempt<T, F, Fut>(&self, manager: ConnectionManager, f: F) -> Result<T, Failure>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let err = match tokio::time::timeout(CALL_TIMEOUT, f(manager)).await {
            Ok(Ok(v)) => {
                self.health.ok();
                return Ok(v);
            }
            Ok(Err(e)) => e,
            Err(_) => {
                // It may still run: never sent again.
                self.health.failed();
                self.forget_primary().await;
                return Err(Failure {
                    error: Unreachable(Cause::msg(format!(
                        "redis did not answer within {} ms",
                        CALL_TIMEOUT.as_millis()
                    ))),
                    retry: false,
                });
            }
        };
        let (lost, refused) = (connection_failed(&err), read_only(&err));
        if lost || refused || err.is_timeout() {
            self.health.failed();
            self.forget_primary().await;
        }
        Err(Failure {
            error: unavailable(&err),
            retry: lost || refused,
        })
    }

    /// Runs one request (a command, pipeline or script) with a time bound,
    /// on a connection checked as the module docs say; it is sent once.
    /// Connection-level failures become `Unavailable`; with Sentinel they
    /// also make the next call re-resolve the primary.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, Unreachable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.attempt(self.ready().await?, f)
            .await
            .map_err(|e| e.error)
    }

    /// Up to `count` entries of the stream `key` between `from` and `to`
    /// (stream ids, `-`, `+`, or `(id` to exclude one), read towards newer
    /// entries (`XRANGE`) or older ones (`XREVRANGE`). A read: sent again
    /// if its connection fails under it.
    pub async fn stream_range<T: redis::FromRedisValue>(
        &self,
        key: &str,
        towards: Towards,
        (from, to): (&str, &str),
        count: usize,
    ) -> Result<T, Unreachable> {
        let command = match towards {
            Towards::Newer => "XRANGE",
            Towards::Older => "XREVRANGE",
        };
        self.run_idempotent(|mut c| async move {
            redis::cmd(command)
                .arg(key)
                .arg(from)
                .arg(to)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut c)
                .await
        })
        .await
    }

    /// [`run`](Self::run) for a request that may be sent twice: a read, or
    /// a write whose repetition is harmless or recognised. Sent again once
    /// when the connection failed under it or a replica refused it.
    pub async fn run_idempotent<T, F, Fut>(&self, f: F) -> Result<T, Unreachable>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_repeatable(f).await.map(|(v, _)| v)
    }

    /// [`run_idempotent`](Self::run_idempotent), also saying whether the
    /// request was sent twice (so a write can tell its own first run from
    /// someone else's record).
    pub async fn run_repeatable<T, F, Fut>(&self, f: F) -> Result<(T, bool), Unreachable>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        match self.attempt(self.ready().await?, &f).await {
            Ok(v) => Ok((v, false)),
            Err(e) if e.retry => {
                tracing::debug!(error = %e.error, "redis connection failed; sending again");
                let v = self
                    .attempt(self.ready().await?, &f)
                    .await
                    .map_err(|e| e.error)?;
                Ok((v, true))
            }
            Err(e) => Err(e.error),
        }
    }

    /// After a failure, a Sentinel deployment asks again who the primary is.
    async fn forget_primary(&self) {
        if self.sentinel.is_some() {
            *self.manager.write().await = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact("redis://u:secret@h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact("rediss://:p@w@h:1"), "rediss://h:1");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
