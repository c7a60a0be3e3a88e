use mayfly_client::NewTask;
use mayfly_testkit::TestBroker;

#[tokio::test]
async fn start_issue_complete() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let task = agent
        .start_task(NewTask::new("smoke", ["https://api.example.com"]).scope("read:x"))
        .await
        .unwrap();
    let token = task.issue_token("https://api.example.com", ["read:x"]).await.unwrap();
    assert_eq!(token.token.split('.').count(), 3);
    let done = task.complete().await.unwrap();
    assert_eq!(done.revoked_leases.len(), 2);
}
