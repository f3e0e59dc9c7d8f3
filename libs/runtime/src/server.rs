//! Serving: binds the gRPC and metrics listeners, adds health and reflection
//! (v1 and v1alpha) for every served service, runs dependency checks (each
//! with its [`Need`] for readiness), and on
//! shutdown drains: readiness NOT_SERVING at once, then in-flight calls get
//! the grace period to finish.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use prometheus_client::registry::Registry;
use prost::Message;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    body::Body,
    server::NamedService,
    service::{Routes, RoutesBuilder},
};

use crate::{
    admission::{self, Admission, AdmissionLayer},
    config::ServerConfig,
    grpc::GrpcServerLayer,
    health::{Check, Dependency, Health, Need},
    metrics::{self, HealthMetrics, ServerMetrics},
};

/// Errors while starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Reflection could not be built from the descriptor sets.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS files could not be loaded.
    #[error("tls: {0}")]
    Tls(crate::ConfigError),
}

/// A server being assembled: listeners are bound, services are added, then
/// [`Server::serve`] runs it.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    grpc: TcpListener,
    metrics_listener: TcpListener,
    registry: Registry,
    routes: RoutesBuilder,
    service_names: Vec<String>,
    descriptor_sets: Vec<&'static [u8]>,
    checks: Vec<Dependency>,
    draining: CancellationToken,
    /// Mutual TLS on `grpc`, when configured.
    tls: Option<crate::tls::MeshTls>,
    /// With TLS: the plaintext listener serving only health.
    health_listener: Option<TcpListener>,
}

impl Server {
    /// Binds both listeners from `config` (port 0 picks a free port).
    pub async fn bind(config: ServerConfig) -> Result<Self, ServeError> {
        let grpc = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| ServeError::Bind { addr: config.listen_addr, source })?;
        let metrics_listener = TcpListener::bind(config.metrics_addr)
            .await
            .map_err(|source| ServeError::Bind { addr: config.metrics_addr, source })?;
        let tls =
            config.tls.as_ref().map(crate::tls::TlsConfig::load).transpose().map_err(ServeError::Tls)?;
        let health_listener = match (&tls, config.health_listen_addr) {
            (Some(_), Some(addr)) => {
                Some(TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?)
            }
            _ => None,
        };
        Ok(Self {
            config,
            grpc,
            metrics_listener,
            registry: metrics::registry(),
            routes: RoutesBuilder::default(),
            service_names: Vec::new(),
            descriptor_sets: vec![mesh_proto::FILE_DESCRIPTOR_SET],
            checks: Vec::new(),
            draining: CancellationToken::new(),
            tls,
            health_listener,
        })
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.grpc.local_addr().expect("bound listener has an address")
    }

    /// With TLS on: the bound address of the plaintext listener that serves
    /// only `grpc.health.v1.Health` (for probes); `None` without TLS.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        metrics::bound(&self.metrics_listener)
    }

    /// The metrics registry, for the service's own metrics.
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Adds a gRPC service; its full name is served by health and reflection.
    pub fn add_service<S>(&mut self, svc: S) -> &mut Self
    where
        S: tower::Service<http::Request<Body>, Error = std::convert::Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.service_names.push(S::NAME.to_owned());
        self.routes.add_service(svc);
        self
    }

    /// Adds the encoded descriptor set of services that are not in `mesh-proto`.
    pub fn add_descriptor_set(&mut self, set: &'static [u8]) -> &mut Self {
        self.descriptor_sets.push(set);
        self
    }

    /// A token cancelled when draining starts (SIGTERM): long-lived streams
    /// should end then (e.g. with UNAVAILABLE, so clients resume elsewhere)
    /// instead of holding the grace period open.
    pub fn draining(&self) -> CancellationToken {
        self.draining.child_token()
    }

    /// Adds a dependency, checked every health interval: its state is the
    /// health name `dependency:<name>` and the gauge
    /// `mesh_dependency_up{dependency="<name>"}`; `need` says how readiness
    /// follows it (see [`Need`]).
    pub fn add_dependency(&mut self, check: Check, need: Need) -> &mut Self {
        self.checks.push(Dependency { check, need });
        self
    }

    /// Adds a dependency readiness follows ([`Need::Required`]).
    pub fn add_check(&mut self, check: Check) -> &mut Self {
        self.add_dependency(check, Need::Required)
    }

    /// Serves until `shutdown` resolves, then drains (see the module docs).
    /// `on_ready` receives the [`Health`] handle once serving starts.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        self.serve_with(shutdown, |_| {}).await
    }

    /// As [`Server::serve`], handing the [`Health`] handle to `on_health` first.
    pub async fn serve_with(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
        on_health: impl FnOnce(&Health),
    ) -> Result<(), ServeError> {
        let (health, health_service) = Health::new(
            self.service_names.clone(),
            &self.checks,
            HealthMetrics::register(&mut self.registry),
        );
        on_health(&health);

        let mut served = self.service_names.clone();
        served.extend(
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
            .map(String::from),
        );
        let descriptor_sets = reflected_sets(&self.descriptor_sets);
        let reflection = || {
            // Both versions serve the same files, so each can describe every
            // listed service (the other version's included).
            let mut b = tonic_reflection::server::Builder::configure().include_reflection_service(false);
            for set in &descriptor_sets {
                b = b.register_encoded_file_descriptor_set(set);
            }
            for name in &served {
                b = b.with_service_name(name.clone());
            }
            b
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let known = known_methods(&descriptor_sets, &served);
        let admission = Admission::register(self.config.limits.clone(), known.keys(), &mut self.registry);
        let layer = GrpcServerLayer::new(ServerMetrics::register(&mut self.registry), known);

        // With TLS, probes that cannot speak it reach health (only) in plaintext.
        let health_only = self.health_listener.take().map(|l| (l, health_service.clone()));
        self.routes.add_service(health_service).add_service(reflection_v1).add_service(reflection_v1alpha);
        let routes: Routes = self.routes.routes();

        let grpc_addr = self.grpc.local_addr().ok();
        let metrics_addr = self.metrics_listener.local_addr().ok();
        let health_addr = health_only.as_ref().and_then(|(l, _)| l.local_addr().ok());
        tracing::info!(
            grpc = ?grpc_addr,
            metrics = ?metrics_addr,
            tls = self.tls.is_some(),
            identity = ?self.tls.as_ref().and_then(crate::tls::MeshTls::identity).map(|i| i.0),
            plaintext_health = ?health_addr,
            services = ?self.service_names,
            "serving"
        );

        let checks_task = tokio::spawn(health.clone().run_checks(
            self.checks,
            self.config.health_interval,
            self.config.health_timeout,
            self.config.health_failure_threshold,
        ));

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let metrics_task = tokio::spawn(metrics::serve_metrics(
            self.metrics_listener,
            Arc::new(self.registry),
            stopped(stop_rx.clone()),
        ));

        let cut = CancellationToken::new();
        let incoming =
            crate::tls::incoming(self.grpc, cut.clone(), self.tls.clone(), stopped(stop_rx.clone()));
        let health_task = health_only.map(|(listener, svc)| {
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped(stop_rx.clone())),
            )
        });
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(self.config.limits.max_concurrent_streams)
            // Outermost: the peer's address and TLS identity, for every layer below.
            .layer(crate::tls::PeerLayer)
            // The span and metrics layer sees shed calls too.
            .layer(layer)
            .layer(AdmissionLayer::new(admission.clone()))
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                admission::limit_connections(incoming, admission),
                stopped(stop_rx.clone()),
            );
        tokio::pin!(server);

        let early = tokio::select! {
            r = &mut server => Some(r),
            () = shutdown => None,
        };
        let result = match early {
            Some(r) => r.map_err(ServeError::from),
            None => {
                tracing::info!(grace = ?self.config.shutdown_grace, "shutting down: readiness NOT_SERVING, draining");
                health.drain().await;
                self.draining.cancel();
                tokio::time::sleep(self.config.drain_delay).await;
                let _ = stop_tx.send(true);
                // Watch streams would otherwise hold the grace period open.
                health.close();
                match tokio::time::timeout(self.config.shutdown_grace, &mut server).await {
                    Ok(r) => r.map_err(ServeError::from),
                    Err(_) => {
                        tracing::warn!("grace period over, cutting calls still in flight");
                        cut.cancel();
                        // Connections fail at their next read or write; give
                        // their tasks a moment to notice and close.
                        let _ = tokio::time::timeout(Duration::from_secs(1), &mut server).await;
                        Ok(())
                    }
                }
            }
        };
        let _ = stop_tx.send(true);
        checks_task.abort();
        if let Some(t) = health_task {
            t.abort();
        }
        let _ = metrics_task.await;
        tracing::info!("stopped");
        result
    }
}

/// Every descriptor set reflection serves: the service's own (`own`, which
/// starts with `mesh-proto`'s), health, both reflection versions, and the
/// `google.rpc` error details (`BadRequest`, `RetryInfo`, `ErrorInfo`, …)
/// that errors carry, so a client can decode them.
fn reflected_sets(own: &[&'static [u8]]) -> Vec<&'static [u8]> {
    let mut sets = own.to_vec();
    sets.extend([
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
    ]);
    sets
}

/// `/package.Service/Method` of every method of the served services, with its
/// `grpc_type` label.
fn known_methods(sets: &[&[u8]], served: &[String]) -> HashMap<String, &'static str> {
    let served: HashSet<&str> = served.iter().map(String::as_str).collect();
    let mut known = HashMap::new();
    for set in sets {
        let Ok(fds) = prost_types::FileDescriptorSet::decode(*set) else { continue };
        for file in &fds.file {
            for svc in &file.service {
                let full = format!("{}.{}", file.package(), svc.name());
                if !served.contains(full.as_str()) {
                    continue;
                }
                for m in &svc.method {
                    let kind = metrics::grpc_type(m.client_streaming(), m.server_streaming());
                    known.insert(format!("/{full}/{}", m.name()), kind);
                }
            }
        }
    }
    known
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("can listen for SIGTERM");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message as _;

    use super::reflected_sets;

    /// Reflection can resolve every file it serves: each import of each
    /// file is served too (a client builds a file only with its imports),
    /// and the error-detail types errors carry are among them.
    #[test]
    fn reflection_serves_every_import_and_the_error_details() {
        let mut files = BTreeSet::new();
        let mut imports = BTreeSet::new();
        let mut symbols = BTreeSet::new();
        for set in reflected_sets(&[mesh_proto::FILE_DESCRIPTOR_SET]) {
            let fds = prost_types::FileDescriptorSet::decode(set).unwrap();
            for f in fds.file {
                imports.extend(f.dependency.iter().cloned());
                for m in &f.message_type {
                    symbols.insert(format!("{}.{}", f.package(), m.name()));
                }
                for s in &f.service {
                    symbols.insert(format!("{}.{}", f.package(), s.name()));
                }
                files.insert(f.name().to_owned());
            }
        }
        let missing: Vec<_> = imports.difference(&files).collect();
        assert!(missing.is_empty(), "imported but not served: {missing:?}");
        for symbol in [
            "google.rpc.BadRequest",
            "google.rpc.RetryInfo",
            "google.rpc.ErrorInfo",
            "google.rpc.Status",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(symbols.contains(symbol), "{symbol} not served");
        }
    }
}
