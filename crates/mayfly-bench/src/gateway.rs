//! `--mix gateway`: what the tool-call gateway costs. In one run, against
//! a running broker (a `mayfly dev init` profile: its gateway identity and
//! `[[gateways]]` entry), it starts a trivial MCP upstream and the gateway
//! in process, then measures
//! - calls per second straight to the upstream and through the gateway
//!   (closed loop, the two interleaved in rounds so that the machine's
//!   noise falls on both), and their ratio;
//! - latency at a fixed rate (`--rate`, default 1,000/s), straight and
//!   through, and what the gateway adds at p50 and p99;
//! - the decision RPC (`AuthorizeCall`, as the gateway) per second next to
//!   `IssueToken` (as the agent), closed loop, interleaved the same way.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mayfly_client::{Client, ClientConfig, pb};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// The dev gateway's identity and upstream, as `mayfly dev init` writes them.
const IDENTITY: &str = "identities/gateway-dev";
const UPSTREAM: &str = "billing";
const AUDIENCE: &str = "https://tools.example.com";
const SCOPE: &str = "read:billing";

/// Rounds each closed-loop comparison is split into.
const ROUNDS: u32 = 4;

/// The body of one call.
const CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_invoice","arguments":{"invoice_id":"inv-7"}}}"#;

/// What the gateway run is told.
#[derive(Debug)]
pub struct Settings<'a> {
    pub profile: &'a Path,
    pub broker: String,
    /// The broker's issuer (its HTTPS URL).
    pub issuer: String,
    pub agent: ClientConfig,
    pub concurrency: usize,
    pub duration: Duration,
    pub rate: f64,
}

/// A measured load: successes, failures, latencies.
struct Measured {
    ok: u64,
    failed: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    fn add(&mut self, other: Measured) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.elapsed += other.elapsed;
        let _ = self.latency.add(&other.latency);
    }

    fn empty() -> Self {
        Self {
            ok: 0,
            failed: 0,
            elapsed: Duration::ZERO,
            latency: histogram(),
        }
    }
}

/// Microseconds, 1 µs to 60 s, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// A trivial MCP server: every POST gets the same tool result.
async fn trivial_upstream() -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let answer = Bytes::from_static(
        br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"ok"}]}}"#,
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let answer = answer.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(answer))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// One call to `url`: whether it was answered 200 with a result.
async fn call(http: &HttpClient, url: &str, token: &str) -> bool {
    let Ok(req) = hyper::Request::post(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Full::new(Bytes::from_static(CALL.as_bytes())))
    else {
        return false;
    };
    match http.request(req).await {
        Ok(resp) if resp.status() == 200 => resp
            .into_body()
            .collect()
            .await
            .is_ok_and(|b| b.to_bytes().windows(8).any(|w| w == b"\"result\"")),
        _ => false,
    }
}

/// Runs `op` in a closed loop with `concurrency` in flight for `duration`.
async fn closed<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Measured
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let start = Instant::now();
    let end = start + duration;
    let merged = Arc::new(Mutex::new(histogram()));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (op, merged, ok, failed) = (op.clone(), merged.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let mut h = histogram();
            while Instant::now() < end {
                let t = Instant::now();
                if op().await {
                    let _ = h.record(t.elapsed().as_micros() as u64);
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = merged.lock().await.add(&h);
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let latency = merged.lock().await.clone();
    Measured {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
        latency,
    }
}

/// Starts `op` `rate` times a second for `duration`; latency counts from
/// each intended start.
async fn fixed<F, Fut>(rate: f64, duration: Duration, op: F) -> Measured
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (duration.as_secs_f64() * rate) as u64;
    let mut calls = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let op = op.clone();
        calls.push(tokio::spawn(async move {
            let ok = op().await;
            (ok, due.elapsed())
        }));
    }
    let mut m = Measured::empty();
    for c in calls {
        match c.await {
            Ok((true, took)) => {
                m.ok += 1;
                let _ = m.latency.record(took.as_micros() as u64);
            }
            _ => m.failed += 1,
        }
    }
    m.elapsed = start.elapsed();
    m
}

fn gateway_config(
    profile: &Path,
    broker: &str,
    issuer: &str,
    upstream: std::net::SocketAddr,
) -> anyhow::Result<mayfly_gateway::GatewayConfig> {
    let text = format!(
        r#"
approval_wait = "0s"
[listen]
addr = "127.0.0.1:0"
[broker]
url = "{broker}"
issuer = "{issuer}"
ca = "bundle.pem"
cert = "{IDENTITY}/svid.pem"
key = "{IDENTITY}/svid.key"
[[upstreams]]
name = "{UPSTREAM}"
protocol = "mcp"
path = "/billing/mcp"
audience = "{AUDIENCE}"
url = "http://{upstream}/mcp"
"#
    );
    let mut config: mayfly_gateway::GatewayConfig = toml::from_str(&text)?;
    config.resolve(profile);
    config.check()?;
    Ok(config)
}

/// The whole gateway run: a JSON report.
pub async fn run(s: Settings<'_>) -> anyhow::Result<Value> {
    if !s.profile.join(IDENTITY).exists() {
        bail!(
            "{} has no {IDENTITY}: --mix gateway needs a profile from this version's `mayfly dev init` (its gateway identity and [[gateways]] entry)",
            s.profile.display()
        );
    }
    let upstream = trivial_upstream().await?;
    let gateway = mayfly_gateway::start(gateway_config(s.profile, &s.broker, &s.issuer, upstream)?)
        .await
        .context("starting the gateway")?;
    let through = format!("http://{}/billing/mcp", gateway.addr);
    let direct = format!("http://{upstream}/mcp");

    let agent = Client::connect(&s.agent).await?;
    let task = agent
        .broker()
        .start_task(pb::StartTaskRequest {
            intent: "mayfly-bench gateway".into(),
            audiences: vec![AUDIENCE.into()],
            scopes: vec![SCOPE.into()],
            ttl_seconds: 3600,
            ..Default::default()
        })
        .await?
        .into_inner();
    let issue = pb::IssueTokenRequest {
        task_id: task.task_id.clone(),
        audience: AUDIENCE.into(),
        scopes: vec![SCOPE.into()],
        ..Default::default()
    };
    let token = agent
        .broker()
        .issue_token(issue.clone())
        .await?
        .into_inner();
    let http: HttpClient =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let op = |url: String| {
        let (http, token) = (http.clone(), token.token.clone());
        move || {
            let (http, token, url) = (http.clone(), token.clone(), url.clone());
            async move { call(&http, &url, &token).await }
        }
    };
    if !op(through.clone())().await {
        bail!(
            "a call through the gateway failed: is the dev broker's [[gateways]] entry there, and its tool policies?"
        );
    }

    // Closed loop, interleaved.
    let round = s.duration / ROUNDS;
    let (mut straight, mut gated) = (Measured::empty(), Measured::empty());
    for _ in 0..ROUNDS {
        straight.add(closed(s.concurrency, round, op(direct.clone())).await);
        gated.add(closed(s.concurrency, round, op(through.clone())).await);
    }
    // Fixed rate.
    let straight_fixed = fixed(s.rate, s.duration, op(direct.clone())).await;
    let gated_fixed = fixed(s.rate, s.duration, op(through.clone())).await;

    // The decision RPC next to IssueToken.
    let svid = s.profile.join(IDENTITY);
    let gw_client = Client::connect(&ClientConfig::from_files(
        &s.broker,
        s.profile.join("bundle.pem"),
        svid.join("svid.pem"),
        svid.join("svid.key"),
    )?)
    .await?;
    let decide = {
        let client = pb::gateway_client::GatewayClient::new(gw_client.channel());
        let lease = token.lease_id.clone();
        move || {
            let mut client = client.clone();
            let req = pb::AuthorizeCallRequest {
                lease_id: lease.clone(),
                tool: format!("{UPSTREAM}/read_invoice"),
                arguments: r#"{"invoice_id":"inv-7"}"#.into(),
                ..Default::default()
            };
            async move {
                client
                    .authorize_call(req)
                    .await
                    .is_ok_and(|r| r.get_ref().allowed)
            }
        }
    };
    let issue_op = {
        let client = agent.broker();
        move || {
            let mut client = client.clone();
            let req = issue.clone();
            async move { client.issue_token(req).await.is_ok() }
        }
    };
    // The decision alone at the same fixed rate: how much of what the
    // gateway adds is the broker's answer.
    let decision_fixed = fixed(s.rate, s.duration, decide.clone()).await;
    let (mut decisions, mut issued) = (Measured::empty(), Measured::empty());
    for _ in 0..ROUNDS {
        decisions.add(closed(s.concurrency, round, decide.clone()).await);
        issued.add(closed(s.concurrency, round, issue_op.clone()).await);
    }
    let _ = agent
        .broker()
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.task_id,
        })
        .await;
    gateway.stop().await;

    let failed = straight.failed
        + gated.failed
        + straight_fixed.failed
        + gated_fixed.failed
        + decision_fixed.failed;
    let summary = |m: &Measured| {
        json!({
            "ok": m.ok, "failed": m.failed, "per_second": m.per_second(),
            "latency_ms": {"p50": m.ms(0.5), "p90": m.ms(0.9), "p99": m.ms(0.99), "max": m.latency.max() as f64 / 1000.0},
        })
    };
    Ok(json!({
        "mix": "gateway",
        "concurrency": s.concurrency,
        "duration_seconds": s.duration.as_secs_f64(),
        "failed": failed + decisions.failed + issued.failed,
        "closed_loop": {
            "direct": summary(&straight),
            "through_gateway": summary(&gated),
            "ratio": gated.per_second() / straight.per_second(),
        },
        "fixed_rate": {
            "per_second": s.rate,
            "direct": summary(&straight_fixed),
            "through_gateway": summary(&gated_fixed),
            "added_ms": {
                "p50": gated_fixed.ms(0.5) - straight_fixed.ms(0.5),
                "p99": gated_fixed.ms(0.99) - straight_fixed.ms(0.99),
            },
            "authorize_call_alone": summary(&decision_fixed),
        },
        "decisions": {
            "authorize_call": summary(&decisions),
            "issue_token": summary(&issued),
            "ratio": decisions.per_second() / issued.per_second(),
        },
    }))
}

/// The report for people.
pub fn print(doc: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let c = &doc["closed_loop"];
    println!(
        "mix gateway, {} in flight, {:.1} s per phase",
        doc["concurrency"],
        f(&doc["duration_seconds"])
    );
    println!("closed loop (interleaved in {ROUNDS} rounds):");
    for (name, m) in [
        ("straight to the upstream", &c["direct"]),
        ("through the gateway", &c["through_gateway"]),
    ] {
        println!(
            "  {name:<26} {:>8.0} calls/s  p50 {:.2} ms  p99 {:.2} ms",
            f(&m["per_second"]),
            f(&m["latency_ms"]["p50"]),
            f(&m["latency_ms"]["p99"])
        );
    }
    println!("  through / straight: {:.2}", f(&c["ratio"]));
    let r = &doc["fixed_rate"];
    println!("fixed rate {:.0}/s:", f(&r["per_second"]));
    for (name, m) in [
        ("straight to the upstream", &r["direct"]),
        ("through the gateway", &r["through_gateway"]),
    ] {
        println!(
            "  {name:<26} p50 {:.2} ms  p99 {:.2} ms  ({} ok, {} failed)",
            f(&m["latency_ms"]["p50"]),
            f(&m["latency_ms"]["p99"]),
            m["ok"],
            m["failed"]
        );
    }
    println!(
        "  added by the gateway: p50 {:.2} ms, p99 {:.2} ms",
        f(&r["added_ms"]["p50"]),
        f(&r["added_ms"]["p99"])
    );
    let alone = &r["authorize_call_alone"]["latency_ms"];
    println!(
        "  of which the decision (AuthorizeCall alone, same rate): p50 {:.2} ms, p99 {:.2} ms",
        f(&alone["p50"]),
        f(&alone["p99"])
    );
    let d = &doc["decisions"];
    println!(
        "decisions: AuthorizeCall {:.0}/s, IssueToken {:.0}/s, ratio {:.2}",
        f(&d["authorize_call"]["per_second"]),
        f(&d["issue_token"]["per_second"]),
        f(&d["ratio"])
    );
}
