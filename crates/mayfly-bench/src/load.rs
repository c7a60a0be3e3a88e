//! The load: operations over real mTLS gRPC, closed loop or at a fixed
//! rate, with every latency in an HDR histogram.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use mayfly_client::{Client, Refusal, pb};
use tokio::sync::Semaphore;
use tonic::Code;

use crate::http::TokenEndpoint;

/// What one operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    /// IssueToken under a task started once per connection.
    Token,
    /// SignCertificate of a CSR made once per connection.
    Cert,
    /// StartTask, IssueToken ×k, CompleteTask.
    Lifecycle,
    /// `POST /oauth2/token` (client credentials, over HTTP/2 and mTLS)
    /// under a task started once per connection.
    Oauth,
    /// An MCP tool call through the gateway, next to the same call
    /// straight to the upstream, and AuthorizeCall next to IssueToken
    /// (`gateway.rs`; it runs on its own, not in lanes).
    Gateway,
}

/// The request shape.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Which operation.
    pub mix: Mix,
    /// Token audience (in the task's envelope).
    pub audience: String,
    /// Token scopes.
    pub scopes: Vec<String>,
    /// Tokens per lifecycle.
    pub tokens_per_task: usize,
    /// Task lifetime for `token` and `cert`: the run and some.
    pub task_ttl: Duration,
    /// Credential lifetime asked for, in seconds (0: the broker's default).
    pub ttl_seconds: u64,
}

/// One connection and what its operations need.
pub struct Lane {
    client: Client,
    task_id: String,
    csr: Vec<u8>,
    /// The token endpoint, and the form posted to it, for `oauth`.
    oauth: Option<(TokenEndpoint, String)>,
}

/// Counts shared by the workers while the run goes.
#[derive(Debug, Default)]
pub struct Progress {
    /// Operations that succeeded.
    pub ok: AtomicU64,
    /// Operations that failed.
    pub failed: AtomicU64,
    /// Failures that were RESOURCE_EXHAUSTED (the broker's rate limit).
    pub rate_limited: AtomicU64,
    /// At a fixed rate: starts skipped because every slot was busy.
    pub dropped: AtomicU64,
}

/// Latencies of successful operations, in microseconds.
pub fn histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits; the bounds are constants.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn task_request(shape: &Shape, ttl: Duration) -> pb::StartTaskRequest {
    pb::StartTaskRequest {
        intent: "mayfly-bench load".into(),
        context: [("environment".to_owned(), "bench".to_owned())].into(),
        audiences: vec![shape.audience.clone()],
        scopes: shape.scopes.clone(),
        ttl_seconds: ttl.as_secs().max(1),
    }
}

fn token_request(shape: &Shape, task_id: &str) -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        task_id: task_id.to_owned(),
        audience: shape.audience.clone(),
        scopes: shape.scopes.clone(),
        ttl_seconds: shape.ttl_seconds,
        bind_to_client_cert: false,
        approval_id: String::new(),
        dpop_jwk: String::new(),
    }
}

impl Lane {
    /// Prepares a connection: its task (for `token`, `cert` and `oauth`),
    /// its CSR, and for `oauth` the form for `endpoint`.
    pub async fn prepare(
        client: Client,
        shape: &Shape,
        endpoint: Option<TokenEndpoint>,
    ) -> anyhow::Result<Self> {
        let task_id = if shape.mix == Mix::Lifecycle {
            String::new()
        } else {
            client
                .broker()
                .start_task(task_request(shape, shape.task_ttl))
                .await
                .context("StartTask for the run")?
                .into_inner()
                .task_id
        };
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .der()
            .to_vec();
        let oauth = endpoint.map(|e| {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials")
                .append_pair("task_id", &task_id)
                .append_pair("resource", &shape.audience)
                .append_pair("scope", &shape.scopes.join(" "));
            (e, form.finish())
        });
        Ok(Self {
            client,
            task_id,
            csr,
            oauth,
        })
    }

    /// One operation; the number of RPCs it made, or the status that
    /// failed it.
    async fn run_once(&self, shape: &Shape) -> Result<u64, Refusal> {
        match shape.mix {
            Mix::Token => {
                self.client
                    .issue_token(token_request(shape, &self.task_id))
                    .await?;
                Ok(1)
            }
            Mix::Cert => {
                self.client
                    .broker()
                    .sign_certificate(pb::SignCertificateRequest {
                        task_id: self.task_id.clone(),
                        csr: self.csr.clone(),
                        ttl_seconds: shape.ttl_seconds,
                        approval_id: String::new(),
                    })
                    .await?;
                Ok(1)
            }
            Mix::Oauth => {
                let (endpoint, form) = self
                    .oauth
                    .as_ref()
                    .ok_or_else(|| Refusal::from(tonic::Status::internal("no token endpoint")))?;
                endpoint.token(form).await.map_err(|e| {
                    Refusal::from(if e.to_string().starts_with("429") {
                        tonic::Status::resource_exhausted(e.to_string())
                    } else {
                        tonic::Status::unknown(e.to_string())
                    })
                })?;
                Ok(1)
            }
            Mix::Lifecycle => {
                let task = self
                    .client
                    .broker()
                    .start_task(task_request(shape, Duration::from_secs(300)))
                    .await?
                    .into_inner();
                for _ in 0..shape.tokens_per_task {
                    self.client
                        .issue_token(token_request(shape, &task.task_id))
                        .await?;
                }
                self.client.complete_task(&task.task_id).await?;
                Ok(2 + shape.tokens_per_task as u64)
            }
            Mix::Gateway => Err(Refusal::from(tonic::Status::internal(
                "the gateway mix does not run in lanes",
            ))),
        }
    }

    /// Ends the run's task, so its leases do not outlive the run.
    pub async fn finish(&self) {
        if !self.task_id.is_empty() {
            let _ = self.client.complete_task(&self.task_id).await;
        }
    }
}

/// How requests are started.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// `concurrency` loops, each starting the next as the last ends.
    Closed {
        /// Loops.
        concurrency: usize,
    },
    /// `per_second` starts in total, at most `concurrency` in flight;
    /// latency counts from the intended start.
    Fixed {
        /// Starts per second.
        per_second: f64,
        /// Most in flight.
        concurrency: usize,
    },
}

/// What a run measured.
pub struct Outcome {
    /// Successful operations' latencies (µs).
    pub latency: Histogram<u64>,
    /// RPCs made by successful operations.
    pub rpcs: u64,
    /// Wall time of the measured part.
    pub elapsed: Duration,
}

struct Shared {
    lanes: Vec<Lane>,
    shape: Shape,
    progress: Arc<Progress>,
    rpcs: AtomicU64,
    deadline: Instant,
}

impl Shared {
    /// One operation; its latency in µs if it succeeded.
    async fn one(&self, lane: usize, started: Instant) -> Option<u64> {
        match self.lanes[lane].run_once(&self.shape).await {
            Ok(n) => {
                self.rpcs.fetch_add(n, Ordering::Relaxed);
                self.progress.ok.fetch_add(1, Ordering::Relaxed);
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                Some(us.max(1))
            }
            Err(s) => {
                if s.code == Code::ResourceExhausted {
                    self.progress.rate_limited.fetch_add(1, Ordering::Relaxed);
                }
                self.progress.failed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// Runs `pace` over `lanes` for `duration`.
pub async fn run(
    lanes: Vec<Lane>,
    shape: Shape,
    pace: Pace,
    duration: Duration,
    progress: Arc<Progress>,
) -> (Outcome, Vec<Lane>) {
    let start = Instant::now();
    let shared = Arc::new(Shared {
        lanes,
        shape,
        progress,
        rpcs: AtomicU64::new(0),
        deadline: start + duration,
    });
    let mut latency = histogram();
    match pace {
        Pace::Closed { concurrency } => {
            let workers: Vec<_> = (0..concurrency)
                .map(|i| {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let mut hist = histogram();
                        let lane = i % shared.lanes.len();
                        while Instant::now() < shared.deadline {
                            if let Some(us) = shared.one(lane, Instant::now()).await {
                                hist.saturating_record(us);
                            }
                        }
                        hist
                    })
                })
                .collect();
            for w in workers {
                if let Ok(h) = w.await {
                    let _ = latency.add(h);
                }
            }
        }
        Pace::Fixed {
            per_second,
            concurrency,
        } => {
            let slots = Arc::new(Semaphore::new(concurrency));
            let interval = Duration::from_secs_f64(1.0 / per_second.max(0.001));
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let mut next = Instant::now();
            let mut n = 0usize;
            while next < shared.deadline {
                tokio::time::sleep_until(next.into()).await;
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (shared, tx) = (shared.clone(), tx.clone());
                        let (lane, intended) = (n % shared.lanes.len(), next);
                        tokio::spawn(async move {
                            let us = shared.one(lane, intended).await;
                            drop(permit);
                            // Before the sender goes: once every sender is
                            // gone the run takes the lanes back out of
                            // `shared`, which needs the last reference.
                            drop(shared);
                            if let Some(us) = us {
                                let _ = tx.send(us);
                            }
                        });
                    }
                    Err(_) => {
                        shared.progress.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
                next += interval;
            }
            drop(tx);
            while let Some(us) = rx.recv().await {
                latency.saturating_record(us);
            }
        }
    }
    let elapsed = start.elapsed();
    let rpcs = shared.rpcs.load(Ordering::Relaxed);
    let lanes = match Arc::try_unwrap(shared) {
        Ok(s) => s.lanes,
        Err(_) => Vec::new(),
    };
    (
        Outcome {
            latency,
            rpcs,
            elapsed,
        },
        lanes,
    )
}
