//! The standard gRPC health service (`grpc.health.v1.Health`) and server
//! reflection. Health follows the store: every service reports SERVING
//! while the store answers its check and NOT_SERVING when it does not, as
//! `/readyz` does over HTTPS. It is served on the mTLS port and, when
//! `listen.health` is set, alone on a plain-text port for probes that
//! cannot present a client certificate (Kubernetes gRPC probes).

use std::sync::Arc;
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::shutdown::Shutdown;
use crate::store::Upkeep;

/// How often the store is checked.
const EVERY: Duration = Duration::from_secs(1);
/// A check slower than this counts as a failure.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The services whose health is reported, besides the server as a whole
/// (`""`).
pub const SERVICES: [&str; 5] = [
    "mayfly.v1.Broker",
    "mayfly.v1.Admin",
    "mayfly.v1.Revocations",
    "mayfly.v1.Gateway",
    "mayfly.v1.Requests",
];

/// Reflection for the mayfly API and the health service, in both protocol
/// versions that tools ask for (grpcurl, grpcui, Postman).
pub fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mayfly_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // The descriptor sets are compiled in; failing to read them is a build
    // defect, caught by every test that starts a broker.
    #[allow(clippy::expect_used)]
    (
        builder().build_v1().expect("descriptor sets are valid"),
        builder()
            .build_v1alpha()
            .expect("descriptor sets are valid"),
    )
}

/// Reports the store's health until `stop` is set; starts NOT_SERVING.
pub async fn follow_store(reporter: HealthReporter, store: Arc<dyn Upkeep>, mut stop: Shutdown) {
    let mut last = None;
    loop {
        let status = match tokio::time::timeout(TIMEOUT, store.check()).await {
            Ok(Ok(())) => ServingStatus::Serving,
            Ok(Err(e)) => {
                if last != Some(ServingStatus::NotServing) {
                    tracing::warn!(error = %e, "gRPC health: NOT_SERVING, the store is unavailable");
                }
                ServingStatus::NotServing
            }
            Err(_) => ServingStatus::NotServing,
        };
        if last != Some(status) {
            reporter.set_service_status("", status).await;
            for s in SERVICES {
                reporter.set_service_status(s, status).await;
            }
            last = Some(status);
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = stop.wait() => return,
        }
    }
}
