//! `mayfly-bench`: drives a running broker over real mTLS gRPC and, in the
//! same run, measures what this machine could do at best (signing in
//! process, the store's raw write), so every figure comes with its ratio
//! to the limit.
//!
//! ```sh
//! mayfly-bench --mix token --connections 4 --concurrency 32 --duration 10s
//! mayfly-bench --mix token --rate 2000 --duration 10s       # fixed rate
//! mayfly-bench --mix lifecycle --tokens-per-task 5 --json
//! mayfly-bench --mix oauth --duration 10s   # POST /oauth2/token over HTTP/2
//! mayfly-bench --mix gateway --duration 8s  # tool calls through the gateway, and straight
//! mayfly-bench --workload-token token.jwt  # bearer workload token, no certificate
//! ```
//!
//! It connects with the SPIFFE Workload API (`--workload-api`), or a
//! `mayfly dev init` profile (`--profile`, default
//! `./.mayfly-dev`) or `--broker/--ca/--cert/--key`. Turn the broker's rate
//! limit off for load tests (`[rate_limit] per_second = 0`).

#![forbid(unsafe_code)]

mod gateway;
mod http;
mod limits;
mod load;

// The same allocator as the broker, so the load costs the shared cores no
// more than it must.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use mayfly_broker::issuer::Algorithm;
use mayfly_client::profile::{DEFAULT_PROFILE, Overrides, Role, from_profile};
use mayfly_client::{Client, ClientConfig};
use serde_json::json;

use crate::limits::Target;
use crate::load::{Lane, Mix, Outcome, Pace, Progress, Shape};

/// Load generator for a Mayfly broker.
#[derive(Debug, Parser)]
#[command(name = "mayfly-bench", version, about)]
struct Args {
    /// What one operation is.
    #[arg(long, value_enum, default_value = "token")]
    mix: Mix,
    /// gRPC connections (each its own TLS session).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight (closed loop: loops; fixed rate: at most).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Run before measuring (not counted).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Start this many operations per second instead of a closed loop;
    /// latency then counts from each intended start.
    #[arg(long)]
    rate: Option<f64>,
    /// Credential lifetime to ask for (0: the broker's default). A long
    /// one keeps what a run issued live, e.g. to fill the store before a
    /// scaling run.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Leave the run's tasks open at the end, so what it issued stays live
    /// (with --ttl, to fill the store before a scaling run).
    #[arg(long)]
    leave_tasks: bool,
    /// Tokens per task in the `lifecycle` mix.
    #[arg(long, default_value_t = 5)]
    tokens_per_task: usize,
    /// Token audience (the dev policies allow this one).
    #[arg(long, default_value = "https://api.example.com")]
    audience: String,
    /// Token scope (repeatable).
    #[arg(long = "scope", default_values_t = ["read:files".to_owned()])]
    scopes: Vec<String>,
    /// The broker's token algorithm, for the signing limit.
    #[arg(long, default_value = "ES256", value_parser = parse_algorithm)]
    algorithm: Algorithm,
    /// The store to measure raw writes against: embedded (a scratch store
    /// under --store-dir, on the broker's disk), redis (--redis-url), or
    /// none.
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Where the scratch embedded store goes: put it on the broker's disk.
    #[arg(long, default_value = ".")]
    store_dir: PathBuf,
    /// The broker's Redis, for `--store redis`.
    #[arg(long)]
    redis_url: Option<String>,
    /// How long each limit is measured.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    limit_duration: Duration,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Profile directory from `mayfly dev init`.
    #[arg(long, env = "MAYFLY_PROFILE")]
    profile: Option<PathBuf>,
    /// The broker's HTTPS URL, for `--mix oauth` (default: the gRPC
    /// port's host, next port).
    #[arg(long, env = "MAYFLY_HTTP")]
    http: Option<String>,
    /// Identity under the profile's identities/ (default: its agent).
    #[arg(long, env = "MAYFLY_IDENTITY")]
    identity: Option<String>,
    /// Broker gRPC URL.
    #[arg(long, env = "MAYFLY_BROKER")]
    broker: Option<String>,
    /// CA bundle for the broker's certificate.
    #[arg(long, env = "MAYFLY_CA")]
    ca: Option<PathBuf>,
    /// Your X.509-SVID.
    #[arg(long, env = "MAYFLY_CERT")]
    cert: Option<PathBuf>,
    /// Your SVID's key.
    #[arg(long, env = "MAYFLY_KEY")]
    key: Option<PathBuf>,
    /// Take the agent's X.509-SVID from this SPIFFE Workload API (e.g.
    /// unix:///run/spire/agent.sock) instead of files, following its
    /// rotations; --cert and --key win when given.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    workload_api: Option<String>,
    /// Authenticate with the workload token in this file instead of a
    /// client certificate (every connection presents it: its issuer's
    /// `[[federation]]` entry must say `single_use = false`, or pass
    /// --connections 1).
    #[arg(long, env = "MAYFLY_TOKEN_FILE")]
    workload_token: Option<PathBuf>,
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    match s {
        "ES256" => Ok(Algorithm::ES256),
        "EdDSA" => Ok(Algorithm::EdDSA),
        _ => Err(format!("{s:?}: expected ES256 or EdDSA")),
    }
}

impl Args {
    fn profile_dir(&self) -> Option<PathBuf> {
        self.profile.clone().or_else(|| {
            let d = PathBuf::from(DEFAULT_PROFILE);
            d.join("profile.toml").exists().then_some(d)
        })
    }

    fn client_config(&self) -> anyhow::Result<ClientConfig> {
        if let (Some(b), Some(ca), Some(cert), Some(key)) =
            (&self.broker, &self.ca, &self.cert, &self.key)
        {
            return Ok(ClientConfig::from_files(b, ca, cert, key)?);
        }
        let Some(dir) = self.profile_dir() else {
            bail!(
                "no broker: pass --profile DIR (from `mayfly dev init`) or --broker, --ca, --cert and --key"
            );
        };
        let over = Overrides {
            broker: self.broker.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            identity: self.identity.clone(),
        };
        Ok(from_profile(&dir, Role::Agent, &over)?)
    }

    /// With `--workload-token`: the broker, its CA (from the flags, else
    /// the profile) and the token.
    fn token_connection(&self) -> anyhow::Result<Option<TokenConnection>> {
        let Some(path) = &self.workload_token else {
            return Ok(None);
        };
        let token = mayfly_client::read_token_file(path)?;
        let (broker, ca_pem) = match (&self.broker, &self.ca) {
            (Some(b), Some(ca)) => (
                b.clone(),
                std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
            ),
            _ => {
                let c = self.client_config()?;
                (c.broker, c.ca_pem)
            }
        };
        Ok(Some(TokenConnection {
            broker,
            ca_pem,
            token,
        }))
    }

    /// The HTTPS port: `--http`, else the gRPC port's host and the next
    /// port (as `mayfly dev init` lays them out).
    fn http_url(&self, grpc: &str) -> anyhow::Result<String> {
        if let Some(u) = &self.http {
            return Ok(u.clone());
        }
        let (base, port) = grpc
            .trim_end_matches('/')
            .rsplit_once(':')
            .context("cannot tell the HTTPS port from the broker URL: pass --http")?;
        let port: u16 = port.parse().context("pass --http")?;
        Ok(format!("{base}:{}", port + 1))
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.connections == 0 || self.concurrency == 0 {
            bail!("--connections and --concurrency must be at least 1");
        }
        if self.duration.is_zero() {
            bail!("--duration must be positive");
        }
        if self.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            bail!("--rate must be a positive number of operations per second");
        }
        match self.store.as_str() {
            "embedded" | "none" => Ok(()),
            "redis" if self.redis_url.is_some() => Ok(()),
            "redis" => bail!("--store redis needs --redis-url"),
            other => bail!("--store {other:?}: expected embedded, redis or none"),
        }
    }
}

/// Where and how a `--workload-token` run connects.
struct TokenConnection {
    broker: String,
    ca_pem: Vec<u8>,
    token: String,
}

/// The in-process limits measured in this run (operations per second).
#[derive(Debug, Default)]
struct Limits {
    sign: Option<f64>,
    cert: Option<f64>,
    store: Option<f64>,
    sign_store: Option<f64>,
}

async fn measure_limits(args: &Args) -> anyhow::Result<Limits> {
    let d = args.limit_duration;
    let mut out = Limits {
        sign: Some(limits::sign_rate(args.algorithm, d)?),
        ..Limits::default()
    };
    if args.mix == Mix::Cert
        && let Some(dir) = args.profile_dir()
    {
        out.cert =
            limits::cert_rate(&dir.join("issuing-ca.pem"), &dir.join("issuing-ca.key"), d).ok();
    }
    let target = match args.store.as_str() {
        "embedded" => Some(Target::embedded(&args.store_dir).await?),
        "redis" => Some(Target::redis(args.redis_url.as_deref().unwrap_or_default()).await?),
        _ => None,
    };
    if let Some(target) = target {
        let target = Arc::new(target);
        out.store = Some(limits::write_rate(target.clone(), None, args.concurrency, d).await?);
        let signer = Arc::new(limits::signer(args.algorithm)?);
        out.sign_store =
            Some(limits::write_rate(target.clone(), Some(signer), args.concurrency, d).await?);
        target.clean().await;
    }
    Ok(out)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// The limit an operation of `mix` is held to, and what it is called.
fn limit_for(mix: Mix, l: &Limits, tokens_per_task: usize) -> Option<(f64, &'static str)> {
    match mix {
        Mix::Token | Mix::Oauth => l.sign_store.map(|v| (v, "in-process sign + store write")),
        Mix::Cert => match (l.cert, l.store) {
            (Some(c), Some(s)) => Some((c.min(s), "in-process certificate signing, store write")),
            (Some(c), None) => Some((c, "in-process certificate signing")),
            (None, s) => s.map(|s| (s, "store write")),
        },
        Mix::Gateway => None,
        // StartTask + k tokens + CompleteTask: k + 2 store writes.
        Mix::Lifecycle => l.store.map(|s| {
            (
                s / (tokens_per_task as f64 + 2.0),
                "store writes (k + 2 per lifecycle)",
            )
        }),
    }
}

fn report(args: &Args, outcome: &Outcome, progress: &Progress, limits: &Limits) {
    let secs = outcome.elapsed.as_secs_f64();
    let ok = outcome.latency.len();
    let rate = ok as f64 / secs;
    let h = &outcome.latency;
    let limit = limit_for(args.mix, limits, args.tokens_per_task);
    let (failed, limited, dropped) = (
        progress.failed.load(Ordering::Relaxed),
        progress.rate_limited.load(Ordering::Relaxed),
        progress.dropped.load(Ordering::Relaxed),
    );
    if args.json {
        let doc = json!({
            "mix": format!("{:?}", args.mix).to_lowercase(),
            "connections": args.connections,
            "concurrency": args.concurrency,
            "pace": match args.rate { Some(r) => json!({"fixed_per_second": r}), None => json!("closed") },
            "duration_seconds": secs,
            "ok": ok,
            "failed": failed,
            "rate_limited": limited,
            "dropped": dropped,
            "per_second": rate,
            "rpcs_per_second": outcome.rpcs as f64 / secs,
            "latency_ms": {
                "p50": ms(h, 0.5), "p90": ms(h, 0.9), "p99": ms(h, 0.99),
                "p999": ms(h, 0.999), "max": h.max() as f64 / 1000.0,
            },
            "limits_per_second": {
                "sign": limits.sign, "certificate": limits.cert,
                "store_write": limits.store, "sign_and_store": limits.sign_store,
            },
            "limit": limit.map(|(v, what)| json!({"per_second": v, "what": what, "ratio": rate / v})),
        });
        println!("{doc:#}");
        return;
    }
    let pace = match args.rate {
        Some(r) => format!("fixed rate {r}/s, at most {} in flight", args.concurrency),
        None => format!("closed loop, {} in flight", args.concurrency),
    };
    println!(
        "mix {:?}, {} connection(s), {pace}, {secs:.1} s",
        args.mix, args.connections
    );
    println!(
        "  {ok} ok, {failed} failed ({limited} rate limited), {dropped} not started (all slots busy)"
    );
    println!(
        "  throughput  {rate:>10.0} op/s   ({:.0} RPC/s)",
        outcome.rpcs as f64 / secs
    );
    println!(
        "  latency ms  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(h, 0.5),
        ms(h, 0.9),
        ms(h, 0.99),
        ms(h, 0.999),
        h.max() as f64 / 1000.0
    );
    println!("limits, in process on this machine, same run:");
    let row = |name: &str, v: Option<f64>| {
        if let Some(v) = v {
            println!("  {name:<28} {v:>10.0} /s");
        }
    };
    row("token signing (all cores)", limits.sign);
    row("certificate signing", limits.cert);
    row("store write", limits.store);
    row("sign + store write", limits.sign_store);
    if let Some((v, what)) = limit {
        println!(
            "achieved / limit: {:.2}  (limit: {what}, {v:.0}/s)",
            rate / v
        );
    }
    if limited > 0 {
        println!(
            "note: the broker's rate limit refused requests; set [rate_limit] per_second = 0 for load tests"
        );
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    args.validate()?;
    if args.mix == Mix::Gateway {
        return run_gateway(&args).await;
    }
    let workload = args
        .workload_api
        .clone()
        .filter(|_| args.cert.is_none() || args.key.is_none());
    if workload.is_some() && args.mix == Mix::Oauth {
        bail!("--mix oauth authenticates with certificate files: pass --cert and --key");
    }
    let token = args.token_connection()?;
    if token.is_some() && args.mix == Mix::Oauth {
        bail!("--mix oauth authenticates with certificate files, not --workload-token");
    }
    // From the Workload API only the broker's URL is needed here (from
    // --broker, else the profile); the SVID comes from the socket.
    let (broker, config) = match (&token, &workload, &args.broker) {
        (Some(t), _, _) => (t.broker.clone(), None),
        (None, Some(_), Some(broker)) => (broker.clone(), None),
        (None, Some(_), None) => (args.client_config()?.broker, None),
        (None, None, _) => {
            let config = args.client_config()?;
            (config.broker.clone(), Some(config))
        }
    };
    let mut lanes = Vec::with_capacity(args.connections);
    let shape = Shape {
        mix: args.mix,
        audience: args.audience.clone(),
        scopes: args.scopes.clone(),
        tokens_per_task: args.tokens_per_task,
        task_ttl: args.warmup + args.duration + Duration::from_secs(300).max(args.ttl),
        ttl_seconds: args.ttl.as_secs(),
    };
    for _ in 0..args.connections {
        let client = match (&token, &workload, &config) {
            (Some(t), _, _) => Client::connect_with_token(&t.broker, &t.ca_pem, &t.token).await?,
            (None, Some(endpoint), _) => {
                Client::connect_workload_api(&broker, Some(endpoint)).await?
            }
            (None, None, Some(config)) => Client::connect(config).await?,
            (None, None, None) => {
                unreachable!("files give the config when no Workload API or token does")
            }
        };
        let endpoint = match (args.mix, &config) {
            (Mix::Oauth, Some(config)) => Some(
                http::TokenEndpoint::connect(&args.http_url(&broker)?, config)
                    .await
                    .context("connecting to the token endpoint (--http)")?,
            ),
            _ => None,
        };
        lanes.push(Lane::prepare(client, &shape, endpoint).await?);
    }
    let pace = match args.rate {
        Some(per_second) => Pace::Fixed {
            per_second,
            concurrency: args.concurrency,
        },
        None => Pace::Closed {
            concurrency: args.concurrency,
        },
    };
    if !args.warmup.is_zero() {
        let (_, back) = load::run(
            lanes,
            shape.clone(),
            pace,
            args.warmup,
            Arc::new(Progress::default()),
        )
        .await;
        lanes = back;
    }
    let progress = Arc::new(Progress::default());
    let ticker = tokio::spawn(show_progress(progress.clone(), args.duration));
    let (outcome, lanes) = load::run(lanes, shape, pace, args.duration, progress.clone()).await;
    ticker.abort();
    eprintln!();
    if !args.leave_tasks {
        for lane in &lanes {
            lane.finish().await;
        }
    }
    if outcome.latency.is_empty() {
        bail!(
            "no operation succeeded ({} failed); is the broker up, and does policy allow {} for this identity?",
            progress.failed.load(Ordering::Relaxed),
            args.audience
        );
    }
    eprintln!("measuring the in-process limits…");
    let limits = measure_limits(&args)
        .await
        .context("measuring the limits")?;
    report(&args, &outcome, &progress, &limits);
    Ok(())
}

/// `--mix gateway`: against a dev profile's broker, with its gateway
/// identity.
async fn run_gateway(args: &Args) -> anyhow::Result<()> {
    let Some(profile) = args.profile_dir() else {
        bail!("--mix gateway needs a `mayfly dev init` profile (--profile DIR)");
    };
    let agent = args.client_config()?;
    let doc = gateway::run(gateway::Settings {
        profile: &profile,
        broker: agent.broker.clone(),
        issuer: args.http_url(&agent.broker)?,
        agent,
        concurrency: args.concurrency,
        duration: args.duration,
        rate: args.rate.unwrap_or(1000.0),
    })
    .await?;
    if args.json {
        println!("{doc:#}");
    } else {
        gateway::print(&doc);
    }
    Ok(())
}

/// One line a second on stderr: elapsed, done, failed, current rate.
async fn show_progress(p: Arc<Progress>, total: Duration) {
    let start = Instant::now();
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let ok = p.ok.load(Ordering::Relaxed);
        let line = format!(
            "  {:>4.0}/{:.0} s  {ok:>9} ok  {:>6} failed  {:>8}/s",
            start.elapsed().as_secs_f64(),
            total.as_secs_f64(),
            p.failed.load(Ordering::Relaxed),
            ok - last
        );
        // Rewritten in place on a terminal, one line each in a log.
        let mut err = std::io::stderr();
        if err.is_terminal() {
            let _ = write!(err, "\r{line}   ");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        last = ok;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
