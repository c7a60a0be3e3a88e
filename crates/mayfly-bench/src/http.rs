//! The `oauth` mix's client: one HTTP/2 connection over mTLS to the
//! broker's HTTPS port per lane, authenticating with the same X.509-SVID
//! as the gRPC lanes, posting `client_credentials` requests to
//! `/oauth2/token` as any OAuth client would.

use std::sync::Arc;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mayfly_client::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A connection to the token endpoint.
#[derive(Clone)]
pub struct TokenEndpoint {
    send: SendRequest<Full<Bytes>>,
    url: hyper::Uri,
}

impl TokenEndpoint {
    /// Connects to `base` (`https://host:port`, the HTTPS port) as the
    /// identity in `config`.
    pub async fn connect(base: &str, config: &ClientConfig) -> anyhow::Result<Self> {
        let url: hyper::Uri = format!("{}/oauth2/token", base.trim_end_matches('/'))
            .parse()
            .context("--http must be an https://host:port URL")?;
        let host = url.host().context("--http has no host")?.to_owned();
        let port = url.port_u16().unwrap_or(443);
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&config.ca_pem) {
            roots.add(c?)?;
        }
        let chain =
            CertificateDer::pem_slice_iter(&config.cert_pem).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(&config.key_pem)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        tcp.set_nodelay(true)?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ServerName::try_from(host)?, tcp)
            .await?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(conn);
        Ok(Self { send, url })
    }

    /// One `client_credentials` request for `form`; an error unless 200.
    pub async fn token(&self, form: &str) -> anyhow::Result<()> {
        let req = hyper::Request::post(self.url.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form.to_owned())))?;
        let resp = self.send.clone().send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if status != hyper::StatusCode::OK {
            bail!("{status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }
}
