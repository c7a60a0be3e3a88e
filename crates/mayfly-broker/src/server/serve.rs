//! Serving: both ports, the plain-text health port, the feed, the policy
//! watcher and the reaper, all following one shutdown signal; then
//! draining, and releasing the store.

use std::future::Future;
use std::io;

use mayfly_core::limits::MAX_MESSAGE_BYTES;
use mayfly_proto::v1::admin_server::AdminServer;
use mayfly_proto::v1::broker_server::BrokerServer;
use mayfly_proto::v1::gateway_server::GatewayServer;
use mayfly_proto::v1::requests_server::RequestsServer;
use mayfly_proto::v1::revocations_server::RevocationsServer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tower::ServiceBuilder;

use super::{Broker, StartError};
use crate::connections::{self, Gate, PeerInfo, Port};
use crate::grpc::{AdminApi, BrokerApi, GatewayApi, GrpcEdgeLayer, RequestsApi, TokenAuthLayer};
use crate::metrics::RpcMetricsLayer;
use crate::{http, reaper, shutdown};

impl Broker {
    /// Serves gRPC on `grpc` and HTTPS on `http` until `shutdown` completes,
    /// then drains connections and returns once the store is released.
    pub async fn serve(
        mut self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let (stop_tx, stop_rx) = shutdown::channel();
        let store = self.service.store().clone();
        let metrics = self.service.metrics().clone();

        let broker_api = BrokerServer::new(BrokerApi::new(self.service.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let admin_api = AdminServer::new(AdminApi::new(self.service.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let gateway_api = GatewayServer::new(GatewayApi::new(self.service.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let requests_api = RequestsServer::new(RequestsApi::new(self.service.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (reporter, health_api) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let health_task = tokio::spawn(crate::health::follow_store(
            reporter,
            store.clone(),
            stop_rx.clone(),
        ));
        let (reflection_v1, reflection_v1alpha) = crate::health::reflection();
        // Unauthenticated peers are refused before their request body is read.
        let routes = Routes::new(InterceptedService::new(broker_api, require_peer))
            .add_service(InterceptedService::new(admin_api, require_peer))
            .add_service(InterceptedService::new(gateway_api, require_peer))
            .add_service(InterceptedService::new(requests_api, require_peer))
            .add_service(InterceptedService::new(
                RevocationsServer::new(self.revocations.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
                require_peer,
            ))
            .add_service(InterceptedService::new(health_api.clone(), require_peer))
            .add_service(InterceptedService::new(reflection_v1, require_peer))
            .add_service(InterceptedService::new(reflection_v1alpha, require_peer))
            .prepare();
        let grpc_service = ServiceBuilder::new()
            .layer(RpcMetricsLayer(metrics.clone()))
            .layer(GrpcEdgeLayer)
            .service(routes);
        // Workload tokens, when issuers are configured, prove callers
        // without a client certificate.
        let federation = self.federation.clone();
        let store_for_tokens = store.clone();
        let mut grpc_task = tokio::spawn(connections::serve(
            grpc,
            Gate::new(Port::Grpc, self.connections.clone(), metrics.clone()),
            TlsAcceptor::from(self.tls.grpc.clone()),
            self.authenticator.clone(),
            move |peer: PeerInfo| {
                ServiceBuilder::new()
                    .layer(axum::Extension(peer))
                    .option_layer(federation.clone().map(|federation| TokenAuthLayer {
                        federation,
                        store: store_for_tokens.clone(),
                    }))
                    .service(grpc_service.clone())
            },
            stop_rx.clone(),
        ));
        let plain_health_task = self.health_listener.take().map(|listener| {
            let mut stop = stop_rx.clone();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(health_api)
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        async move { stop.wait().await },
                    ),
            )
        });

        let signals = crate::signals::Signals::new(
            &self.issuer,
            store.clone(),
            self.signer.clone(),
            &self.feed,
            &self.signals.push_ca_pem,
        )
        .map_err(|e| StartError::Io(std::io::Error::other(format!("shared signals: {e}"))))?;
        let signals_task = tokio::spawn(signals.clone().supervise(stop_rx.clone()));
        let ssf = std::sync::Arc::new(http::ssf::SsfState {
            signals,
            receivers: self.signals.receivers.clone(),
            push: self.signals.push.clone(),
            audience: format!("{}/ssf", self.issuer.trim_end_matches('/')),
        });
        let algs = [self.signer.alg()];
        let router = http::router(
            &self.issuer,
            self.signer.clone(),
            &http::metadata(&self.issuer, &algs, self.federation.is_some()),
            self.service.clone(),
            http::Published {
                crl: self.crl.clone(),
                status_lists: self.status_lists.clone(),
                federation: self.federation.clone(),
                ssf: Some(ssf),
            },
        );
        let http_task = tokio::spawn(connections::serve(
            http,
            Gate::new(Port::Https, self.connections.clone(), metrics.clone()),
            TlsAcceptor::from(self.tls.http.clone()),
            self.authenticator.clone(),
            move |peer: PeerInfo| router.clone().layer(axum::Extension(peer)),
            stop_rx.clone(),
        ));
        let feed_task = tokio::spawn(self.feed.clone().run(stop_rx.clone()));
        if let Some(f) = self.federation.clone() {
            // Each issuer's JWKS, fetched now rather than at the first
            // token, and again as it ages.
            let (fresh, mut stop) = (f.clone(), stop_rx.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = fresh.keep_fresh() => {}
                    () = stop.wait() => {}
                }
            });
            if let Some(endpoint) = self.tls.live.workload_api()
                && f.wants_workload_bundle()
            {
                tokio::spawn(crate::workload::follow_jwt_bundles(
                    f,
                    endpoint.to_owned(),
                    self.trust_domain.clone(),
                    stop_rx.clone(),
                ));
            }
        }
        let keys_task = tokio::spawn(crate::issuer::watch_keys(
            self.signer.clone(),
            self.keys.dir.clone(),
            self.keys.alg,
            self.keys.interval,
            self.keys.rotation,
            stop_rx.clone(),
        ));
        let ca_task = self.cas.clone().map(|(ring, files)| {
            tokio::spawn(crate::issuer::watch_cas(
                ring,
                files,
                super::assemble::crl_base(&self.issuer),
                self.tls_reload,
                stop_rx.clone(),
            ))
        });
        let tls_task = match self.tls.live.workload_api() {
            Some(endpoint) => tokio::spawn(crate::workload::follow(
                self.tls.live.clone(),
                endpoint.to_owned(),
                self.trust_domain.clone(),
                stop_rx.clone(),
            )),
            None => tokio::spawn(crate::tls::watch_and_reload(
                self.tls.live.clone(),
                self.tls_reload,
                stop_rx.clone(),
            )),
        };
        let policy_task = tokio::spawn(crate::policy::watch_and_reload(
            self.policy.clone(),
            self.service.clone(),
            self.policy_reload,
            stop_rx.clone(),
        ));
        let reaper_task = tokio::spawn(reaper::run(
            store.clone(),
            self.service.recorder().clone(),
            self.service.broker_id().clone(),
            self.reaper.interval,
            self.reaper.retention,
            stop_rx.clone(),
        ));
        let logins_task = tokio::spawn(
            crate::logins::Dropper::new(
                self.service.store().clone(),
                &self.databases,
                self.service.recorder().clone(),
                self.service.broker_id().clone(),
                self.service.metrics().clone(),
            )
            .run(self.feed.clone(), stop_rx.clone()),
        );
        tracing::info!(issuer = %self.issuer, kid = %self.signer.kid(), "broker serving");

        let early = tokio::select! {
            () = shutdown => false,
            _ = &mut grpc_task => true,
        };
        stop_tx.fire();
        if !early {
            let _ = grpc_task.await;
        }
        let _ = http_task.await;
        let _ = reaper_task.await;
        let _ = logins_task.await;
        let _ = feed_task.await;
        let _ = policy_task.await;
        let _ = tls_task.await;
        let _ = keys_task.await;
        let _ = signals_task.await;
        if let Some(t) = ca_task {
            let _ = t.await;
        }
        let _ = health_task.await;
        let plain_health = match plain_health_task {
            Some(t) => t.await.map_err(|e| io::Error::other(e.to_string()))?,
            None => Ok(()),
        };
        drop(self);
        drop(store);
        tracing::info!("broker stopped");
        if early {
            return Err(io::Error::other("the gRPC port stopped accepting connections").into());
        }
        plain_health.map_err(StartError::from)
    }
}

/// Refuses, before the body is decoded, requests on a connection whose peer
/// did not authenticate; handlers still obtain their caller through
/// [`crate::grpc::caller`].
fn require_peer(req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    crate::grpc::caller(&req)?;
    Ok(req)
}
