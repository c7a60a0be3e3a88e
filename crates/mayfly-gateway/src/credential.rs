//! The upstream's own credential: what the gateway adds to each request
//! it forwards, so that the agent never holds it. The agent's token and
//! proof never go on; one of these takes their place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use crate::config::{BrokerConfig, CredentialConfig};
use crate::refusal::Refusal;
use crate::tls::{self, HttpClient};

/// A fetched token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(30);

/// Most bytes of a token endpoint's answer.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// Most exchanged tokens kept (one per agent token).
const MAX_EXCHANGED: usize = 10_000;

/// What the gateway presents to one upstream.
pub enum UpstreamCredential {
    /// Nothing.
    None,
    /// A fixed header (an API key).
    Header(HeaderName, HeaderValue),
    /// An OAuth client's token, fetched and kept.
    OauthClient(OauthClient),
    /// A Mayfly token for the upstream, exchanged for each agent token.
    Exchange(Exchange),
}

impl std::fmt::Debug for UpstreamCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "None",
            Self::Header(name, _) => return write!(f, "Header({name}: …)"),
            Self::OauthClient(_) => "OauthClient(…)",
            Self::Exchange(_) => "Exchange(…)",
        })
    }
}

/// OAuth 2.0 client credentials.
pub struct OauthClient {
    http: HttpClient,
    token_url: String,
    client_id: String,
    secret: Zeroizing<String>,
    scopes: Vec<String>,
    cached: Mutex<Option<(HeaderValue, Instant)>>,
}

/// RFC 8693 at the broker, as the gateway.
pub struct Exchange {
    http: HttpClient,
    token_url: String,
    audience: String,
    scopes: Vec<String>,
    /// By the agent token's lease id.
    cached: Mutex<HashMap<String, (HeaderValue, Instant)>>,
}

impl std::fmt::Debug for OauthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OauthClient")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("token_url", &self.token_url)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The secret in `path`, surrounding whitespace dropped.
fn read_secret(path: &std::path::Path) -> Result<Zeroizing<String>, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let value = text.trim();
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Zeroizing::new(value.to_owned()))
}

/// `value` as a header value the client cannot see, refused if it could
/// split the header (a line break in a key file would inject headers).
fn sensitive(value: &str, what: &str) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        format!("{what} holds characters a header cannot carry (a line break, a control character)")
    })?;
    v.set_sensitive(true);
    Ok(v)
}

impl UpstreamCredential {
    /// Builds the credential `config` names, reading its secrets now.
    pub fn load(config: &CredentialConfig, broker: &BrokerConfig) -> Result<Self, String> {
        Ok(match config {
            CredentialConfig::None => Self::None,
            CredentialConfig::Header { name, file, prefix } => {
                let secret = read_secret(file)?;
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("{name:?} is not a header name"))?;
                let value = Zeroizing::new(format!("{prefix}{}", secret.as_str()));
                Self::Header(name, sensitive(&value, &file.display().to_string())?)
            }
            CredentialConfig::OauthClient {
                token_url,
                client_id,
                secret_file,
                scopes,
                ca,
            } => Self::OauthClient(OauthClient {
                http: tls::client(ca.as_deref(), None)?,
                token_url: token_url.clone(),
                client_id: client_id.clone(),
                secret: read_secret(secret_file)?,
                scopes: scopes.clone(),
                cached: Mutex::new(None),
            }),
            CredentialConfig::Exchange { audience, scopes } => Self::Exchange(Exchange {
                http: tls::client(Some(&broker.ca), Some((&broker.cert, &broker.key)))?,
                token_url: format!("{}/oauth2/token", broker.issuer.trim_end_matches('/')),
                audience: audience.clone(),
                scopes: scopes.clone(),
                cached: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The header name the gateway sets, if any: an agent's own header
    /// of that name is dropped.
    pub fn header_name(&self) -> Option<&HeaderName> {
        match self {
            Self::None => None,
            Self::Header(name, _) => Some(name),
            Self::OauthClient(_) | Self::Exchange(_) => Some(&AUTHORIZATION),
        }
    }

    /// The header to add to a request made with the agent's `token`
    /// (lease `lease_id`).
    pub async fn header(
        &self,
        token: &str,
        lease_id: &str,
    ) -> Result<Option<(HeaderName, HeaderValue)>, Refusal> {
        match self {
            Self::None => Ok(None),
            Self::Header(name, value) => Ok(Some((name.clone(), value.clone()))),
            Self::OauthClient(c) => Ok(Some((AUTHORIZATION, c.token().await?))),
            Self::Exchange(e) => Ok(Some((AUTHORIZATION, e.token(token, lease_id).await?))),
        }
    }
}

impl OauthClient {
    async fn token(&self) -> Result<HeaderValue, Refusal> {
        let mut cached = self.cached.lock().await;
        if let Some((value, until)) = &*cached
            && Instant::now() < *until
        {
            return Ok(value.clone());
        }
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            if !self.scopes.is_empty() {
                form.append_pair("scope", &self.scopes.join(" "));
            }
            form.finish()
        };
        // HTTP Basic, which every server supports (RFC 6749 §2.3.1): the
        // id and the secret each form-encoded, then joined by a colon.
        let basic = {
            let encode =
                |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let pair = Zeroizing::new(format!(
                "{}:{}",
                encode(&self.client_id),
                encode(&self.secret)
            ));
            Zeroizing::new(format!("Basic {}", STANDARD.encode(pair.as_bytes())))
        };
        let auth = sensitive(&basic, "the client credentials")
            .map_err(|e| Refusal::unavailable("upstream_credential_unavailable", e))?;
        let (value, until) =
            post_token(&self.http, &self.token_url, body.as_bytes(), Some(auth)).await?;
        *cached = Some((value.clone(), until));
        Ok(value)
    }
}

impl Exchange {
    async fn token(&self, subject: &str, lease_id: &str) -> Result<HeaderValue, Refusal> {
        {
            let cached = self.cached.lock().await;
            if let Some((value, until)) = cached.get(lease_id)
                && Instant::now() < *until
            {
                return Ok(value.clone());
            }
        }
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair(
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            );
            form.append_pair("subject_token", subject);
            form.append_pair(
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            );
            form.append_pair("resource", &self.audience);
            if !self.scopes.is_empty() {
                form.append_pair("scope", &self.scopes.join(" "));
            }
            // The upstream checks neither the gateway's certificate nor a
            // DPoP key: it gets a bearer token, short-lived and of the task.
            form.append_pair("token_binding", "none");
            Zeroizing::new(form.finish())
        };
        let (value, until) = post_token(&self.http, &self.token_url, body.as_bytes(), None).await?;
        let mut cached = self.cached.lock().await;
        if cached.len() >= MAX_EXCHANGED {
            cached.retain(|_, (_, until)| Instant::now() < *until);
        }
        if cached.len() < MAX_EXCHANGED {
            cached.insert(lease_id.to_owned(), (value.clone(), until));
        }
        Ok(value)
    }
}

/// POSTs `form` to a token endpoint: the `Authorization` value of the
/// token it gives, and when to renew it.
async fn post_token(
    http: &HttpClient,
    url: &str,
    form: &[u8],
    auth: Option<HeaderValue>,
) -> Result<(HeaderValue, Instant), Refusal> {
    let unavailable = |why: String| {
        Refusal::unavailable(
            "upstream_credential_unavailable",
            format!("the upstream's credential could not be obtained from {url}: {why}"),
        )
    };
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::copy_from_slice(form)))
        .map_err(|e| unavailable(e.to_string()))?;
    if let Some(auth) = auth {
        req.headers_mut().insert(AUTHORIZATION, auth);
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .map_err(|_| unavailable("no answer in 10s".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
        .collect()
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .to_bytes();
    if status != StatusCode::OK {
        // The endpoint's own error code only (its description may echo
        // what was sent).
        let code = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut r = unavailable(format!("HTTP {status} {code}"));
        if status.is_client_error() {
            r = Refusal::forbidden(
                "upstream_credential_refused",
                format!("the token endpoint {url} refused the upstream's credential: {code}"),
            );
        }
        return Err(r);
    }
    let parsed: TokenResponse =
        serde_json::from_slice(&body).map_err(|_| unavailable("not a token response".into()))?;
    let token = Zeroizing::new(parsed.access_token);
    let value =
        sensitive(&format!("Bearer {}", token.as_str()), "the token").map_err(unavailable)?;
    let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(60));
    let until = Instant::now() + lifetime.saturating_sub(RENEW_BEFORE);
    Ok((value, until))
}

/// Shared handle.
pub type Credential = Arc<UpstreamCredential>;
