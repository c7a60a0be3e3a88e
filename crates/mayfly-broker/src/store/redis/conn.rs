//! The connection to Redis: a multiplexed, self-reconnecting
//! `ConnectionManager` to one server, or to the primary a set of Sentinels
//! names (re-resolved after a connection failure or a `READONLY` reply, i.e.
//! after a failover). Every call is bounded in time, so an outage turns into
//! `StoreError::Unavailable` quickly instead of a hang.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, RedisError};
use tokio::sync::{Mutex, RwLock};

use crate::store::StoreError;

/// One call to Redis may take this long before it counts as an outage.
const CALL_TIMEOUT: Duration = Duration::from_millis(1500);
/// A connection attempt may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
/// A reply may take this long on an established connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(1000);

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
        /// `redis://host:port` of each Sentinel.
        sentinels: Vec<String>,
        /// The monitored primary's name.
        master_name: String,
        /// Password of the data nodes, if any.
        password: Option<String>,
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

fn unavailable(e: &RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// A shared, reconnecting connection.
pub struct RedisConn {
    target: RedisTarget,
    /// For Sentinel: resolves the current primary.
    sentinel: Option<Mutex<SentinelClient>>,
    /// The live manager; `None` until first use or after a failover.
    manager: RwLock<Option<ConnectionManager>>,
}

impl RedisConn {
    /// Prepares a connection; nothing is dialled until the first call.
    pub fn new(target: RedisTarget) -> Result<Self, StoreError> {
        let sentinel = match &target {
            RedisTarget::Url { .. } => None,
            RedisTarget::Sentinel {
                sentinels,
                master_name,
                password,
            } => {
                let mut info = redis::RedisConnectionInfo::default();
                if let Some(p) = password {
                    info = info.set_password(p);
                }
                let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
                let client = SentinelClient::build(
                    sentinels.iter().map(String::as_str).collect(),
                    master_name.as_str(),
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(|e| unavailable(&e))?;
                Some(Mutex::new(client))
            }
        };
        Ok(Self {
            target,
            sentinel,
            manager: RwLock::new(None),
        })
    }

    /// For logs: where, without secrets.
    pub fn describe(&self) -> String {
        format!("{:?}", self.target)
    }

    async fn client(&self) -> Result<Client, StoreError> {
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
                    .map_err(|_| {
                        StoreError::Unavailable("sentinels did not answer in time".into())
                    })?
                    .map_err(|e| unavailable(&e))
            }
            (RedisTarget::Sentinel { .. }, None) => {
                Err(StoreError::Unavailable("sentinel client missing".into()))
            }
        }
    }

    async fn manager(&self) -> Result<ConnectionManager, StoreError> {
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

    /// Runs one request (a command, pipeline or script) with a time bound.
    /// Connection-level failures become `Unavailable`; with Sentinel they
    /// also make the next call re-resolve the primary.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let manager = self.manager().await?;
        let result = tokio::time::timeout(CALL_TIMEOUT, f(manager)).await;
        let err = match result {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => {
                self.forget_primary().await;
                return Err(StoreError::Unavailable(format!(
                    "redis did not answer within {} ms",
                    CALL_TIMEOUT.as_millis()
                )));
            }
        };
        if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_timeout()
            || err.to_string().contains("READONLY")
        {
            self.forget_primary().await;
        }
        Err(unavailable(&err))
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
