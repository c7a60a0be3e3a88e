//! `mayfly-bench` against a real broker: each mix runs, the JSON report
//! holds what it measured (counts, ordered percentiles, the limits and the
//! ratio to them), and bad arguments are refused with a reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use mayfly_testkit::TestBroker;
use serde_json::Value;

fn bench(broker: &TestBroker, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mayfly-bench"))
        .arg("--profile")
        .arg(&broker.layout.dir)
        .args(["--broker", &broker.url()])
        .args(["--store-dir", broker.layout.dir.to_str().unwrap()])
        .args(["--limit-duration", "300ms"])
        .args(args)
        .env_remove("MAYFLY_PROFILE")
        .output()
        .expect("mayfly-bench runs")
}

fn report(out: Output) -> Value {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_mix_reports_throughput_latency_and_the_limit() {
    let broker = TestBroker::start().await;
    for (mix, extra) in [
        ("token", vec!["--warmup", "0s"]),
        ("cert", vec!["--warmup", "0s"]),
        (
            "lifecycle",
            vec!["--warmup", "0s", "--tokens-per-task", "2"],
        ),
        // The lanes come back from a fixed-rate warm-up for the run.
        ("token", vec!["--warmup", "300ms", "--rate", "50"]),
    ] {
        let mut args = vec![
            "--json",
            "--mix",
            mix,
            "--duration",
            "1s",
            "--concurrency",
            "4",
        ];
        args.extend(extra.iter().copied());
        let r = report(bench(&broker, &args));
        let ok = r["ok"].as_u64().unwrap();
        assert!(ok > 0, "{mix}: {r}");
        assert_eq!(r["failed"], 0, "{mix}: {r}");
        let l = &r["latency_ms"];
        assert!(f(&l["p50"]) > 0.0);
        assert!(f(&l["p50"]) <= f(&l["p90"]) && f(&l["p90"]) <= f(&l["p99"]));
        assert!(f(&l["p99"]) <= f(&l["p999"]) && f(&l["p999"]) <= f(&l["max"]));
        let per_second = f(&r["per_second"]);
        assert!((per_second - ok as f64 / f(&r["duration_seconds"])).abs() < 1e-6);
        assert!(f(&r["limits_per_second"]["sign"]) > 0.0);
        assert!(f(&r["limits_per_second"]["store_write"]) > 0.0);
        let limit = &r["limit"];
        assert!((f(&limit["ratio"]) - per_second / f(&limit["per_second"])).abs() < 1e-9);
        match mix {
            "lifecycle" => assert!((f(&r["rpcs_per_second"]) - per_second * 4.0).abs() < 1e-6),
            "cert" => assert!(f(&r["limits_per_second"]["certificate"]) > 0.0),
            _ => {}
        }
        if extra.contains(&"--rate") {
            assert_eq!(r["pace"]["fixed_per_second"], 50.0);
            // About 50 starts in one second, never more.
            assert!(ok + r["dropped"].as_u64().unwrap() <= 51, "{r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_runs_as_the_workload_apis_svid() {
    let broker = TestBroker::start().await;
    // Served by the testkit from the public workload.proto, as SPIRE would.
    let id = "spiffe://example.org/agent/bench";
    let api = broker
        .workload_api(id, std::time::Duration::from_secs(3600))
        .await;
    let out = bench(
        &broker,
        &[
            "--json",
            "--mix",
            "token",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--workload-api",
            &api.endpoint(),
        ],
    );
    let r = report(out);
    assert!(r["ok"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    // The tasks are the Workload API identity's, not the profile's agent.
    let listed = broker
        .operator()
        .await
        .admin()
        .list_tasks(mayfly_client::pb::ListTasksRequest {
            agent_id: id.into(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!listed.tasks.is_empty());
    // The token endpoint mix needs certificate files.
    let out = bench(
        &broker,
        &["--mix", "oauth", "--workload-api", &api.endpoint()],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cert and --key"));
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    for (args, says) in [
        (vec!["--rate", "0"], "--rate must be a positive number"),
        (vec!["--concurrency", "0"], "at least 1"),
        (vec!["--store", "redis"], "--store redis needs --redis-url"),
        (vec!["--store", "mongo"], "expected embedded, redis or none"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mayfly-bench"))
            .args([
                "--broker",
                "https://localhost:1",
                "--ca",
                "x",
                "--cert",
                "x",
                "--key",
                "x",
            ])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_mix_compares_the_gateway_with_the_upstream_alone() {
    let broker = TestBroker::start().await;
    let r = report(bench(
        &broker,
        &[
            "--json",
            "--mix",
            "gateway",
            "--http",
            &broker.issuer(),
            "--duration",
            "1s",
            "--concurrency",
            "4",
            "--rate",
            "50",
        ],
    ));
    assert_eq!(r["mix"], "gateway");
    assert_eq!(r["failed"], 0, "{r}");
    for path in [
        &r["closed_loop"]["direct"],
        &r["closed_loop"]["through_gateway"],
        &r["decisions"]["authorize_call"],
        &r["decisions"]["issue_token"],
    ] {
        assert!(f(&path["per_second"]) > 0.0, "{r}");
        let l = &path["latency_ms"];
        assert!(
            f(&l["p50"]) <= f(&l["p99"]) && f(&l["p99"]) <= f(&l["max"]),
            "{r}"
        );
    }
    // 50/s for 1 s, each way.
    assert_eq!(r["fixed_rate"]["through_gateway"]["ok"], 50, "{r}");
    assert_eq!(r["fixed_rate"]["direct"]["ok"], 50, "{r}");
    let ratio = f(&r["closed_loop"]["ratio"]);
    let expected = f(&r["closed_loop"]["through_gateway"]["per_second"])
        / f(&r["closed_loop"]["direct"]["per_second"]);
    assert!((ratio - expected).abs() < 1e-9, "{r}");
    // The decisions it measured are in the trail.
    let trail = std::fs::read_to_string(broker.config.audit_path()).unwrap();
    assert!(trail.contains("\"tool_call_allowed\""));
}
