//! Who a request's caller is, in one place for both ports: [`caller_of`]
//! reads it from the connection ([`PeerInfo`], authenticated once per
//! connection by `identity`), and [`prove`] proves a workload token, for
//! the gRPC port's `authorization: Bearer` ([`TokenAuth`]) and the HTTPS
//! port's `client_assertion` alike.
//!
//! Callers without a client certificate: on a connection whose peer
//! presented none, a request's `authorization: Bearer <workload token>`
//! proves the caller instead, if a `[[federation]]` issuer vouches for it
//! ([`Federation::verify`]). The outcome replaces the connection's
//! [`PeerInfo`] for that request only, so [`caller_of`] and the
//! interceptors see a token caller as they see a certificate one, and a
//! refused token as `UNAUTHENTICATED` naming the failed check. A peer with
//! a certificate is that certificate's caller; a header beside it is
//! ignored.
//!
//! A token with a `jti` is accepted once per cluster: the first request
//! that presents it records the `jti` in the store and opens a session on
//! its connection, and later requests on that connection with the same
//! token reuse the session until the token expires. The same token on any
//! other connection, through any replica, is a replay.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;

use mayfly_core::Timestamp;

use crate::connections::PeerInfo;
use crate::federation::{Federation, TokenError};
use crate::identity::{AuthError, Caller};
use crate::store::ReplayGuard;

/// The caller of a request on the connection `peer` describes, at `now`:
/// its certificate's or its workload token's, unless that has expired
/// since it was proven.
pub(crate) fn caller_of(peer: &PeerInfo, now: Timestamp) -> Result<Caller, AuthError> {
    match peer.identity.as_ref() {
        Ok(c) if now >= c.not_after => Err(AuthError::Expired),
        Ok(c) => Ok(c.clone()),
        Err(e) => Err(e.clone()),
    }
}

/// Tokens a connection keeps a session for; a new one past this replaces
/// the oldest.
const SESSIONS_PER_CONNECTION: usize = 4;

/// Adds [`TokenAuth`]: applied once per connection, so each connection has
/// its own sessions.
#[derive(Debug, Clone)]
pub struct TokenAuthLayer {
    /// The trusted issuers.
    pub federation: Arc<Federation>,
    /// Where `jti`s are recorded.
    pub store: Arc<dyn ReplayGuard>,
}

impl<S> tower::Layer<S> for TokenAuthLayer {
    type Service = TokenAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenAuth {
            inner,
            federation: self.federation.clone(),
            store: self.store.clone(),
            sessions: Arc::default(),
        }
    }
}

/// Tokens accepted on one connection (by SHA-256) and their callers; and
/// a lock that makes concurrent first uses of a token on the connection
/// wait for one verification, rather than each record the `jti` and all
/// but one be refused as replays.
#[derive(Debug, Default)]
struct ConnectionSessions {
    held: std::sync::Mutex<Vec<([u8; 32], Caller)>>,
    proving: tokio::sync::Mutex<()>,
}

impl ConnectionSessions {
    /// The live session for `hash`, if any.
    fn find(&self, hash: &[u8; 32], now: Timestamp) -> Result<Option<Caller>, TokenError> {
        Ok(self
            .held
            .lock()
            .map_err(|_| TokenError::ReplayCheckUnavailable)?
            .iter()
            .find(|(h, c)| h == hash && c.not_after > now)
            .map(|(_, c)| c.clone()))
    }
}

type Sessions = Arc<ConnectionSessions>;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct TokenAuth<S> {
    inner: S,
    federation: Arc<Federation>,
    store: Arc<dyn ReplayGuard>,
    sessions: Sessions,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// The caller `token` proves on this connection: its session if it has
/// one, else a fresh verification and, for a token with a `jti`, its first
/// use in the cluster.
async fn authenticate(
    token: &str,
    federation: &Federation,
    store: &dyn ReplayGuard,
    sessions: &Sessions,
) -> Result<Caller, TokenError> {
    let hash = sha256(token.as_bytes());
    if let Some(caller) = sessions.find(&hash, Timestamp::now())? {
        return Ok(caller);
    }
    let _one_at_a_time = sessions.proving.lock().await;
    // Another call may have proven it meanwhile.
    let now = Timestamp::now();
    if let Some(caller) = sessions.find(&hash, now)? {
        return Ok(caller);
    }
    let caller = prove(token, federation, store, now).await?;
    if let Ok(mut s) = sessions.held.lock() {
        s.retain(|(_, c)| c.not_after > now);
        if s.len() >= SESSIONS_PER_CONNECTION {
            s.remove(0);
        }
        s.push((hash, caller.clone()));
    }
    Ok(caller)
}

/// Verifies `token` and, if it has a `jti`, records its first use in the
/// cluster (a second use is `Replayed`): what both the gRPC edge and the
/// token endpoint's `client_assertion` accept.
pub(crate) async fn prove(
    token: &str,
    federation: &Federation,
    store: &dyn ReplayGuard,
    now: Timestamp,
) -> Result<Caller, TokenError> {
    let t = federation.verify(token).await?;
    if let Some(jti) = &t.jti {
        let key = hex(&sha256(format!("{}\n{jti}", t.issuer).as_bytes()));
        // Held until the token could no longer pass `exp`, leeway included.
        let until = t.expires_at.plus(std::time::Duration::from_secs(60));
        match store.first_use(&key, until, now).await {
            Ok(true) => {}
            Ok(false) => return Err(TokenError::Replayed(jti.clone())),
            Err(e) => {
                tracing::warn!(error = %e, "workload token replay check failed; token refused");
                return Err(TokenError::ReplayCheckUnavailable);
            }
        }
    }
    tracing::debug!(id = %t.id, issuer = %t.issuer, "caller proven by a workload token");
    Ok(Caller::by_token(t.id, t.issuer, t.expires_at))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token of an `authorization: Bearer …` header.
fn bearer(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

impl<S, B> tower::Service<http::Request<B>> for TokenAuth<S>
where
    S: tower::Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .filter(|p| matches!(p.identity.as_ref(), Err(AuthError::NoCertificate)))
            .cloned();
        let (Some(peer), Some(token)) = (peer, bearer(req.headers())) else {
            return Box::pin(self.inner.call(req));
        };
        // The instance that was polled ready serves this request.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let (federation, store, sessions) = (
            self.federation.clone(),
            self.store.clone(),
            self.sessions.clone(),
        );
        Box::pin(async move {
            let outcome = authenticate(&token, &federation, store.as_ref(), &sessions).await;
            peer.token_outcome(&outcome);
            req.extensions_mut()
                .insert(peer.with_identity(outcome.map_err(AuthError::Token)));
            inner.call(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_a_bearer_authorization() {
        let h = |v: &'static str| {
            let mut m = http::HeaderMap::new();
            m.insert("authorization", http::HeaderValue::from_static(v));
            m
        };
        assert_eq!(bearer(&h("Bearer abc")).as_deref(), Some("abc"));
        assert_eq!(bearer(&h("bearer  abc ")).as_deref(), Some("abc"));
        assert_eq!(bearer(&h("Basic abc")), None);
        assert_eq!(bearer(&h("Bearer")), None);
        assert_eq!(bearer(&http::HeaderMap::new()), None);
    }
}
