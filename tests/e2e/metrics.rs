//! `GET /metrics`: decisions, ended leases, per-method latency with status
//! codes, live leases, feed watchers and audit batches, as a scrape shows
//! them after real traffic; unknown methods never become labels.

use std::time::{Duration, Instant};

use mayfly_client::pb;
use mayfly_testkit::TestBroker;
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_the_traffic() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let task = start(&agent).await;
    for _ in 0..3 {
        issue(&agent, &task.task_id).await;
    }
    assert_status(
        agent
            .issue_token(token_request(&task.task_id, TOOLS, &["read:files"]))
            .await,
        Code::PermissionDenied,
        "outside",
    );
    let other = start(&agent).await;
    let m = scrape(&broker).await;
    assert_eq!(
        sample(&m, "mayfly_active_leases"),
        Some(5.0),
        "two tasks, three tokens"
    );

    // A feed watcher is counted while its stream is open.
    let watcher = broker.client_as("spiffe://example.org/agent/watcher").await;
    let stream = pb::revocations_client::RevocationsClient::new(watcher.channel())
        .watch_revocations(pb::WatchRequest { from_cursor: 0 })
        .await
        .unwrap();
    let m = scrape(&broker).await;
    assert_eq!(sample(&m, "mayfly_feed_watchers"), Some(1.0));
    drop(stream);

    agent.complete_task(&task.task_id).await.unwrap();
    // Something no service has: counted, under `other`.
    let mut unknown = tonic::client::Grpc::new(agent.channel());
    unknown.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/mayfly.v1.Broker/Nope-42");
    let r: Result<tonic::Response<()>, _> = unknown
        .unary(
            tonic::Request::new(()),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(r.unwrap_err().code(), Code::Unimplemented);

    let m = scrape(&broker).await;
    let decisions = |e: &str| sample(&m, &format!("mayfly_decisions_total{{event=\"{e}\"}}"));
    assert_eq!(decisions("task_started"), Some(2.0));
    assert_eq!(decisions("token_issued"), Some(3.0));
    assert_eq!(decisions("token_denied"), Some(1.0));
    assert_eq!(decisions("task_completed"), Some(1.0));
    assert_eq!(
        sample(&m, "mayfly_leases_ended_total{event=\"task_completed\"}"),
        Some(4.0)
    );
    assert_eq!(
        sample(&m, "mayfly_active_leases"),
        Some(1.0),
        "{other:?} is left"
    );
    let calls = |method: &str, code: &str| {
        sample(
            &m,
            &format!(
                "mayfly_rpc_duration_seconds_count{{method=\"/mayfly.v1.Broker/{method}\",code=\"{code}\"}}"
            ),
        )
    };
    assert_eq!(calls("IssueToken", "OK"), Some(3.0));
    assert_eq!(calls("IssueToken", "PERMISSION_DENIED"), Some(1.0));
    assert_eq!(calls("StartTask", "OK"), Some(2.0));
    assert_eq!(
        sample(
            &m,
            "mayfly_rpc_duration_seconds_count{method=\"other\",code=\"UNIMPLEMENTED\"}"
        ),
        Some(1.0)
    );
    assert!(!m.contains("Nope-42"));
    assert!(!m.contains("agent/demo"), "no agent ids in labels");
    assert!(sample(&m, "mayfly_audit_batch_records_count").unwrap() >= 1.0);
    assert_eq!(sample(&m, "mayfly_audit_write_failures_total"), Some(0.0));

    // The watcher's stream closed: the gauge comes back down.
    let t0 = Instant::now();
    while sample(&scrape(&broker).await, "mayfly_feed_watchers") != Some(0.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "watcher never uncounted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A scraper that asks for the Prometheus text format gets it (counters
/// named by their sample, no OpenMetrics-only lines), one that asks for
/// OpenMetrics or says nothing gets OpenMetrics; both hold the build and
/// the process metrics.
#[tokio::test]
async fn a_scraper_gets_the_format_it_asks_for() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    start(&agent).await;
    let url = format!("{}/metrics", broker.http_url());
    let ca = broker.bundle_pem();
    let (status, classic) =
        mayfly_testkit::https_get_with(&url, &ca, &[("accept", "text/plain;version=0.0.4")]).await;
    assert_eq!(status, 200);
    assert!(
        !classic.contains("# EOF") && !classic.contains("# UNIT"),
        "{classic}"
    );
    for line in [
        "# TYPE mayfly_decisions_total counter",
        "mayfly_decisions_total{event=\"task_started\"} 1",
        "# TYPE mayfly_build_info gauge",
        &format!(
            "mayfly_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_resident_memory_bytes gauge",
        "# TYPE process_open_fds gauge",
        "# TYPE process_start_time_seconds gauge",
    ] {
        assert!(
            classic.lines().any(|l| l == line),
            "no {line:?} in:\n{classic}"
        );
    }
    assert!(
        !classic
            .lines()
            .any(|l| l == "# TYPE mayfly_decisions counter"),
        "a counter named by its family"
    );
    // Prometheus asks for OpenMetrics first and text/plain after it.
    let prometheus =
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4";
    for accept in [prometheus, "*/*"] {
        let (_, om) = mayfly_testkit::https_get_with(&url, &ca, &[("accept", accept)]).await;
        assert!(om.ends_with("# EOF\n"), "{accept}: {om}");
        assert!(om.contains("# TYPE mayfly_decisions counter"), "{om}");
        assert!(om.contains("# TYPE mayfly_build info"), "{om}");
    }
    let om = scrape(&broker).await;
    assert!(
        sample(&om, "process_resident_memory_bytes").is_some_and(|b| b > 0.0),
        "{om}"
    );
    assert!(
        sample(&om, "process_open_fds").is_some_and(|n| n > 0.0),
        "{om}"
    );
}
