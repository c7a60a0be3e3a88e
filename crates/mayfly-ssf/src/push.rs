//! Push delivery (RFC 8935): one task per enabled push stream POSTs each
//! SET to the receiver's endpoint, in log order, and raises the stream's
//! floor when the receiver accepts it (202). A receiver that is down or
//! slow is retried with backoff (1 s doubling to a minute, each attempt
//! bounded by [`ATTEMPT_TIMEOUT`]); its stream waits, no other does, and
//! nothing waits on it to revoke. A SET the receiver refuses as invalid
//! (400) is not sent again (RFC 8935 §4): the floor moves past it.
//!
//! One replica pushes a stream at a time ([`Streams::lead`]); a SET may be
//! sent twice only when the leading replica stopped between the
//! receiver's 202 and the floor's write.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::watch;

use crate::model::{Delivery, StreamStatus};
use crate::transmit::{Failure, Streams, Transmitter};
use crate::{SET_MEDIA_TYPE, event::Revoked};

/// The longest one delivery attempt may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The time slots a replica leads a stream in (claiming the next one in
/// the second half of its own).
const LEAD_MS: u64 = 10_000;
/// Retry backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The most of a receiver's answer read (its error body).
const MAX_ANSWER: usize = 16 * 1024;
/// Entries read per log call.
const BATCH: usize = 256;

/// What became of one POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 202: the receiver has it.
    Accepted,
    /// 400: the receiver refused the SET itself (`err` as it said); sending
    /// it again would not help.
    Refused(String),
    /// Anything else (unreachable, timed out, 401, 5xx): worth retrying.
    Failed(String),
}

/// POSTs SETs over HTTPS (checked against the configured CAs) or, to a
/// loopback address only, plain HTTP.
#[derive(Clone)]
pub struct PushClient {
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PushClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushClient").finish_non_exhaustive()
    }
}

impl PushClient {
    /// A client trusting the CA certificates of `ca_pem` for receivers'
    /// endpoints.
    pub fn new(ca_pem: &[u8]) -> Result<Self, Failure> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem) {
            let c = c.map_err(|e| Failure(format!("push CA: {e}")))?;
            roots.add(c).map_err(|e| Failure(format!("push CA: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Failure(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self { tls: Arc::new(tls) })
    }

    /// POSTs `set` to `url`, with `authorization` as its `Authorization`
    /// header; bounded by [`ATTEMPT_TIMEOUT`].
    pub async fn post(&self, url: &str, authorization: Option<&str>, set: &str) -> Outcome {
        match tokio::time::timeout(ATTEMPT_TIMEOUT, self.exchange(url, authorization, set)).await {
            Ok(Ok((202, _))) => Outcome::Accepted,
            Ok(Ok((400, body))) => {
                let err = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["err"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "invalid_request".into());
                Outcome::Refused(err)
            }
            Ok(Ok((status, _))) => Outcome::Failed(format!("answered {status}")),
            Ok(Err(e)) => Outcome::Failed(e.0),
            Err(_) => Outcome::Failed(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
        }
    }

    async fn exchange(
        &self,
        url: &str,
        authorization: Option<&str>,
        set: &str,
    ) -> Result<(u16, Bytes), Failure> {
        let fail = |what: &str, e: &dyn std::fmt::Display| Failure(format!("{what}: {e}"));
        let uri: hyper::Uri = url.parse().map_err(|e| fail("endpoint_url", &e))?;
        let host = uri
            .host()
            .ok_or_else(|| Failure("endpoint_url has no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| fail("connect", &e))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
        let mut req = hyper::Request::post(path)
            .header("host", authority)
            .header("content-type", SET_MEDIA_TYPE)
            .header("accept", "application/json");
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        let req = req
            .body(Full::new(Bytes::from(set.to_owned())))
            .map_err(|e| fail("request", &e))?;
        if https {
            let name = ServerName::try_from(host.clone()).map_err(|e| fail("server name", &e))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| fail("TLS", &e))?;
            send(hyper_util::rt::TokioIo::new(tls), req).await
        } else {
            // `NewStream` let only a loopback address through over http.
            send(hyper_util::rt::TokioIo::new(tcp), req).await
        }
    }
}

async fn send<T>(io: T, req: hyper::Request<Full<Bytes>>) -> Result<(u16, Bytes), Failure>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| Failure(format!("HTTP: {e}")))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Failure(format!("HTTP: {e}")))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok((status, body))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Pushes stream `stream_id` until it is gone, is no longer an enabled
/// push stream, or `stop` fires. `news` changes on every revocation.
pub async fn push_stream(
    tx: Transmitter,
    client: PushClient,
    stream_id: String,
    mut news: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut led_until = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let pause = match step(&tx, &client, &stream_id, &mut led_until).await {
            Ok(Step::Gone) => return,
            Ok(Step::Delivered) => {
                backoff = BACKOFF_MIN;
                continue;
            }
            Ok(Step::Idle) => None,
            Ok(Step::NotLeading) => Some(Duration::from_millis(LEAD_MS - now_ms() % LEAD_MS)),
            Ok(Step::Retry(why)) => {
                tracing::warn!(stream = %stream_id, error = %why, retry_in = ?backoff, "SET push failed");
                let b = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                Some(b)
            }
            Err(e) => {
                tracing::warn!(stream = %stream_id, error = %e, "SET push: store unavailable");
                Some(BACKOFF_MIN)
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            () = async {
                match pause {
                    Some(d) => tokio::time::sleep(d).await,
                    // Idle: until the next revocation (or a second, to
                    // notice a verification or a changed stream).
                    None => {
                        let _ = tokio::time::timeout(Duration::from_secs(1), news.changed()).await;
                    }
                }
            } => {}
        }
    }
}

enum Step {
    /// The stream is gone or delivers no more by push.
    Gone,
    /// Something was delivered (or refused): look again at once.
    Delivered,
    /// Nothing to send.
    Idle,
    /// Another replica pushes it.
    NotLeading,
    /// A delivery failed: retry after the backoff.
    Retry(String),
}

/// One look at the stream: deliver what is waiting, up to a batch.
async fn step(
    tx: &Transmitter,
    client: &PushClient,
    stream_id: &str,
    led_until: &mut u64,
) -> Result<Step, Failure> {
    let streams: &Arc<dyn Streams> = &tx.streams;
    let Some(stream) = streams.get_stream(stream_id).await? else {
        return Ok(Step::Gone);
    };
    let Delivery::Push {
        endpoint_url,
        authorization_header,
    } = &stream.delivery
    else {
        return Ok(Step::Gone);
    };
    if stream.status != StreamStatus::Enabled {
        return Ok(Step::Gone);
    }
    let now = now_ms();
    let slot = now / LEAD_MS;
    if *led_until <= now {
        let until = (slot + 1) * LEAD_MS;
        if !streams.lead(stream_id, slot, until, now).await? {
            return Ok(Step::NotLeading);
        }
        *led_until = until;
    }
    // Leading this slot: claim the next one ahead, so leadership stays.
    if *led_until == (slot + 1) * LEAD_MS && now % LEAD_MS >= LEAD_MS / 2 {
        let until = (slot + 2) * LEAD_MS;
        if streams.lead(stream_id, slot + 1, until, now).await? {
            *led_until = until;
        }
    }
    let auth = authorization_header.as_deref();
    let mut p = streams.progress(stream_id).await?;
    // Verifications first.
    if let Some((jti, set)) = p
        .verifications
        .iter()
        .next()
        .map(|(j, s)| (j.clone(), s.clone()))
    {
        return match client.post(endpoint_url, auth, &set).await {
            Outcome::Accepted | Outcome::Refused(_) => {
                p.verifications.remove(&jti);
                streams.save_progress(stream_id, &p).await?;
                Ok(Step::Delivered)
            }
            Outcome::Failed(why) => Ok(Step::Retry(why)),
        };
    }
    let entries = tx.events.since(p.floor, BATCH).await?;
    if entries.is_empty() {
        return Ok(Step::Idle);
    }
    let iat = now / 1000;
    for e in &entries {
        let wanted: Option<&Revoked> = e.revoked.as_ref().filter(|r| r.wanted_by(&stream));
        if let Some(r) = wanted {
            // No attempt that could outlast the lead: the next leader
            // starts when it ends.
            if now_ms() + ATTEMPT_TIMEOUT.as_millis() as u64 >= *led_until {
                streams.save_progress(stream_id, &p).await?;
                return Ok(Step::NotLeading);
            }
            let set = r.set(&stream, &tx.issuer, iat);
            let signed = tx.sign(&set)?;
            match client.post(endpoint_url, auth, &signed).await {
                Outcome::Accepted => {}
                Outcome::Refused(err) => {
                    tracing::warn!(stream = %stream_id, jti = %set.jti, err = %err,
                        "the receiver refused a SET; not sent again");
                }
                Outcome::Failed(why) => {
                    streams.save_progress(stream_id, &p).await?;
                    return Ok(Step::Retry(why));
                }
            }
        }
        p.floor = e.cursor;
        if wanted.is_some() {
            streams.save_progress(stream_id, &p).await?;
        }
    }
    streams.save_progress(stream_id, &p).await?;
    Ok(Step::Delivered)
}
