//! An agent whose X.509-SVID comes from the SPIFFE Workload API (served by
//! the testkit from the public workload.proto, as SPIRE's agent would):
//! its calls are made as the SVID served now, and it keeps working across
//! three rotations, each new SVID taken for new calls with none failing.

use std::time::Duration;

use mayfly_client::Client;
use mayfly_testkit::TestBroker;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::common::*;

const AGENT: &str = "spiffe://example.org/agent/demo";

fn thumbprint(cert_pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    mayfly_verify::cert_thumbprint(&der)
}

/// The certificate a bound token issued now is bound to.
async fn bound_to(agent: &Client, task: &str) -> String {
    let mut req = token_request(task, API, &["read:files"]);
    req.bind_to_client_cert = true;
    let token = agent
        .issue_token(req)
        .await
        .expect("no call may fail")
        .token;
    claims_unverified(&token)["cnf"]["x5t#S256"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_working_across_three_rotations() {
    let broker = TestBroker::start().await;
    let api = broker.workload_api(AGENT, Duration::from_secs(3600)).await;
    let agent = Client::connect_workload_api(&broker.url(), Some(&api.endpoint()))
        .await
        .unwrap();
    let task = start(&agent).await;
    assert_eq!(task.agent_id, AGENT);
    assert_eq!(
        bound_to(&agent, &task.task_id).await,
        thumbprint(&api.current().cert_pem)
    );

    for _ in 0..3 {
        let before = thumbprint(&api.current().cert_pem);
        let next = thumbprint(&api.rotate().cert_pem);
        assert_ne!(before, next);
        let mut seen = before.clone();
        for _ in 0..200 {
            seen = bound_to(&agent, &task.task_id).await;
            if seen == next {
                break;
            }
            assert_eq!(seen, before, "bound to a certificate nobody served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen, next, "the rotated SVID was never used");
    }
    // The task outlived every rotation and completes as the agent.
    agent.complete_task(&task.task_id).await.unwrap();
}

#[tokio::test]
async fn a_workload_api_without_an_svid_is_a_clear_error() {
    let broker = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("unix://{}/missing.sock", dir.path().display());
    let err = Client::connect_workload_api(&broker.url(), Some(&nowhere))
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("SPIFFE Workload API: "),
        "{err}"
    );
}
