//! Restart durability of the embedded store and of the signing key.

use std::os::unix::fs::PermissionsExt;

use mayfly_client::pb;
use mayfly_testkit::TestBroker;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn revoked_stays_revoked_and_keys_survive_a_restart() {
    let broker = TestBroker::start().await;
    let (revoked, live, task_id) = {
        let agent = broker.agent().await;
        let op = broker.operator().await;
        let task = start(&agent).await;
        let revoked = issue(&agent, &task.task_id).await;
        let live = issue(&agent, &task.task_id).await;
        op.admin()
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: revoked.lease_id.clone(),
                note: String::new(),
            })
            .await
            .unwrap();
        (revoked, live, task.task_id)
    };
    let data = broker.config.data_dir.clone();
    for file in ["jwt-es256.key", "leases.redb"] {
        let mode = std::fs::metadata(data.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    let jwks_before = mayfly_testkit::https_get(
        &format!("{}/.well-known/jwks.json", broker.http_url()),
        &broker.bundle_pem(),
    )
    .await;

    let broker = broker.restart().await;
    let agent = broker.agent().await;
    let op = broker.operator().await;

    let r = lease(&op, &revoked.lease_id).await;
    assert_eq!(r.state, pb::LeaseState::Revoked as i32);
    assert_eq!(r.revocation_reason, pb::RevocationReason::Operator as i32);
    assert_eq!(
        lease(&op, &live.lease_id).await.state,
        pb::LeaseState::Active as i32
    );

    // Same key after restart: the earlier token still validates.
    let jwks_after = mayfly_testkit::https_get(
        &format!("{}/.well-known/jwks.json", broker.http_url()),
        &broker.bundle_pem(),
    )
    .await;
    assert_eq!(jwks_before, jwks_after);
    validate(&broker, &live.token, API).await;

    // The task goes on: issue, complete, and everything is revoked.
    let more = issue(&agent, &task_id).await;
    let done = agent.complete_task(&task_id).await.unwrap();
    assert!(
        done.revoked_leases.contains(&more.lease_id)
            && done.revoked_leases.contains(&live.lease_id)
    );
    assert!(
        !done.revoked_leases.contains(&revoked.lease_id),
        "already revoked"
    );

    let broker = broker.restart().await;
    let op = broker.operator().await;
    let active = all_leases(
        &op,
        pb::ListLeasesRequest {
            state: pb::LeaseState::Active as i32,
            ..Default::default()
        },
    )
    .await;
    assert!(active.is_empty(), "{active:?}");
    assert_status(
        broker
            .agent()
            .await
            .issue_token(token_request(&task_id, API, &[]))
            .await,
        Code::FailedPrecondition,
        "is completed",
    );
}
