//! gRPC health (`grpc.health.v1`) following the store, on the mTLS port
//! and alone on the plain-text probe port, and server reflection listing
//! and describing the API for tools without the proto files.

use std::time::{Duration, Instant};

use mayfly_testkit::{RedisServer, TestBroker};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::common::*;

async fn status(client: &mut HealthClient<Channel>, service: &str) -> Result<i32, tonic::Status> {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

/// Waits until `service` reports `want`, for at most ten seconds.
async fn until(client: &mut HealthClient<Channel>, service: &str, want: ServingStatus) -> Duration {
    let t0 = Instant::now();
    loop {
        if status(client, service).await.ok() == Some(want as i32) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{service} never {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn plain(broker: &TestBroker) -> Channel {
    Channel::from_shared(format!("http://{}", broker.health_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_store_on_both_ports() {
    let mut redis = RedisServer::start();
    let broker = TestBroker::start_on_redis(&redis.url()).await;
    let mut mtls = HealthClient::new(broker.agent().await.channel());
    let mut probe = HealthClient::new(plain(&broker).await);
    for service in [
        "",
        "mayfly.v1.Broker",
        "mayfly.v1.Admin",
        "mayfly.v1.Revocations",
    ] {
        until(&mut mtls, service, ServingStatus::Serving).await;
        until(&mut probe, service, ServingStatus::Serving).await;
    }
    assert_status(
        status(&mut probe, "mayfly.v1.Nope").await,
        Code::NotFound,
        "",
    );

    // The probe port serves health and nothing else.
    let mut broker_api = mayfly_client::pb::broker_client::BrokerClient::new(plain(&broker).await);
    assert_status(
        broker_api
            .start_task(start_request("x", &[API], &["read:files"]))
            .await,
        Code::Unimplemented,
        "",
    );
    // On the mTLS port, health needs an authenticated peer like the rest.
    let mut anonymous = HealthClient::new(broker.anonymous_client().await.channel());
    assert_status(status(&mut anonymous, "").await, Code::Unauthenticated, "");

    redis.kill();
    let down = until(&mut probe, "", ServingStatus::NotServing).await;
    until(&mut mtls, "mayfly.v1.Broker", ServingStatus::NotServing).await;
    redis.restart();
    let up = until(&mut probe, "", ServingStatus::Serving).await;
    println!("health: NOT_SERVING {down:?} after Redis died, SERVING {up:?} after it came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_the_api() {
    let broker = TestBroker::start().await;
    let mut client = ServerReflectionClient::new(broker.operator().await.channel());
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "mayfly.v1.Admin".into(),
        )),
        ask(MessageRequest::FileContainingSymbol(
            "mayfly.v1.Nope".into(),
        )),
    ];
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for want in [
        "grpc.health.v1.Health",
        "mayfly.v1.Admin",
        "mayfly.v1.Broker",
        "mayfly.v1.Revocations",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }

    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor for mayfly.v1.Admin");
    };
    // The file that declares Admin, with ReadAudit in it.
    let admin = files
        .file_descriptor_proto
        .iter()
        .find(|f| f.windows(b"admin.proto".len()).any(|w| w == b"admin.proto"))
        .expect("admin.proto");
    assert!(admin.windows(9).any(|w| w == b"ReadAudit"));

    // An unknown symbol ends the stream with NOT_FOUND.
    assert_status(answers.message().await, Code::NotFound, "mayfly.v1.Nope");
}
