//! [`Channel`]: one upstream service behind the whole client stack, usable
//! with any tonic-generated client.

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{TryFutureExt, future::MapOk};
use http::{Request, Response};
use mesh_runtime::tls::MeshTls;
use mesh_tower::{
    AttemptTimeout, AttemptTimeoutLayer, Balance, BoxError, CircuitBreaker, CircuitBreakerLayer,
    ClientMetrics, DeadlineLayer, EndpointAddr, EndpointStatus, EnforceDeadline, Record, Resolve, Retry,
    RetryLayer, RetryPolicy, StatusBody, SystemResolver, Target, Trace, TraceFuture, TraceLayer, Verdict,
};
use tonic::body::Body;
use tower::{Service, ServiceBuilder};

use crate::config::StackConfig;

/// The service behind each endpoint, breaker outermost.
type Endpoint = AttemptTimeout<tonic::transport::Channel>;
type Stack = Trace<EnforceDeadline<Retry<Balance<Endpoint>>>>;
type StackBody = StatusBody<StatusBody<Body, Verdict>, Record>;
type StackFuture = TraceFuture<<EnforceDeadline<Retry<Balance<Endpoint>>> as Service<Request<Body>>>::Future>;

/// A channel to one upstream service (all its instances) through the mesh
/// client stack. Cheap to clone; clones share connections, load estimates,
/// breakers and the retry budget. Hand it to a tonic-generated client:
/// `EchoServiceClient::new(channel)`.
#[derive(Clone)]
pub struct Channel {
    stack: Stack,
    balance: Balance<Endpoint>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel").field("balance", &self.balance).finish()
    }
}

impl Channel {
    /// Starts building a channel to `upstream` (the name used in metrics and
    /// logs, e.g. `ratelimit`) at `target`.
    pub fn builder(upstream: impl Into<Arc<str>>, target: Target) -> ChannelBuilder {
        ChannelBuilder {
            upstream: upstream.into(),
            target,
            config: StackConfig::default(),
            metrics: ClientMetrics::default(),
            policy: RetryPolicy::default(),
            resolver: Arc::new(SystemResolver),
            tls: None,
        }
    }

    /// The upstream's name.
    pub fn upstream(&self) -> &str {
        self.balance.upstream()
    }

    /// The endpoints and their breakers' states.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.balance.endpoints()
    }
}

/// Builds a [`Channel`].
pub struct ChannelBuilder {
    upstream: Arc<str>,
    target: Target,
    config: StackConfig,
    metrics: ClientMetrics,
    policy: RetryPolicy,
    resolver: Arc<dyn Resolve>,
    tls: Option<MeshTls>,
}

impl fmt::Debug for ChannelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelBuilder")
            .field("upstream", &self.upstream)
            .field("target", &self.target)
            .field("config", &self.config)
            .finish()
    }
}

impl ChannelBuilder {
    /// Tuning of every layer (default: [`StackConfig::default`]).
    pub fn config(mut self, config: StackConfig) -> Self {
        self.config = config;
        self
    }

    /// Where metrics go (default: recorded, not exported).
    pub fn metrics(mut self, metrics: &ClientMetrics) -> Self {
        self.metrics = metrics.clone();
        self
    }

    /// Methods (`/package.Service/Method`) safe to repeat after they reached a server.
    pub fn idempotent<I, M>(mut self, methods: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.policy = RetryPolicy::idempotent(methods);
        self
    }

    /// Dials every endpoint with this TLS configuration (see
    /// [`mesh_runtime::tls`]), whatever [`StackConfig::tls`] says. Without
    /// it, [`StackConfig::tls`] is loaded when set, else connections are
    /// plaintext.
    pub fn tls(mut self, tls: MeshTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How host names are resolved (default: the system resolver).
    pub fn resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = resolver;
        self
    }

    /// Builds the channel. Connections are made lazily, names resolved in a
    /// background task: call this inside a Tokio runtime. When
    /// [`StackConfig::tls`] is set but its files no longer load, every
    /// connection attempt fails (UNAVAILABLE) rather than fall back to
    /// plaintext.
    pub fn build(self) -> Channel {
        let Self { upstream, target, config, metrics, policy, resolver, tls } = self;
        let dial = match (tls, &config.tls) {
            (Some(tls), _) => Dial::Tls(tls),
            (None, Some(files)) => match files.load() {
                Ok(tls) => Dial::Tls(tls),
                Err(e) => {
                    tracing::error!(upstream = %upstream, error = %e, "tls files do not load, calls will fail");
                    Dial::Refuse(Arc::from(e.to_string()))
                }
            },
            (None, None) => Dial::Plain,
        };
        let make = {
            let (upstream, metrics, config) = (upstream.clone(), metrics.clone(), config.clone());
            move |ep: &EndpointAddr| -> CircuitBreaker<Endpoint> {
                ServiceBuilder::new()
                    .layer(CircuitBreakerLayer::new(
                        &config.breaker,
                        upstream.clone(),
                        ep.to_string(),
                        metrics.clone(),
                    ))
                    .layer(AttemptTimeoutLayer::new(config.per_try_timeout))
                    .service(connect(ep, config.connect_timeout, &dial))
            }
        };
        let balance = Balance::new(upstream.clone(), config.balance, metrics.clone(), make);
        mesh_tower::discover(&balance, &target, config.dns_refresh, resolver);
        // Outermost first: trace (client span, traceparent/tracestate,
        // x-request-id, metrics) → deadline (own or inherited budget less a
        // margin; spent: fail fast) → retry (safe cases only, backoff, budget,
        // replayed bodies) → p2c/PeakEWMA balancer → per endpoint (`make`):
        // circuit breaker → attempt timeout → HTTP/2 connection.
        let stack = ServiceBuilder::new()
            .layer(TraceLayer::new(metrics.clone()))
            .layer(DeadlineLayer::new(config.deadline, metrics.clone()))
            .layer(RetryLayer::new(config.retry.clone(), policy, metrics))
            .service(balance.clone());
        Channel { stack, balance }
    }
}

/// How connections to endpoints are made.
#[derive(Debug, Clone)]
enum Dial {
    Plain,
    /// TLS, verifying each server as its configured host; the certificate
    /// in force when a connection opens is the one it presents.
    Tls(MeshTls),
    /// TLS was asked for but does not load: never dial.
    Refuse(Arc<str>),
}

/// A lazily connecting HTTP/2 channel to one endpoint; the configured host is
/// the `:authority` (what a proxy or a virtual host expects).
fn connect(ep: &EndpointAddr, connect_timeout: Duration, dial: &Dial) -> tonic::transport::Channel {
    let host = if ep.host.contains(':') { format!("[{}]", ep.host) } else { ep.host.to_string() };
    let origin = format!("http://{host}:{}", ep.addr.port()).parse().ok();
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", ep.addr))
        .expect("an ip:port uri is valid")
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(origin) = origin {
        endpoint = endpoint.origin(origin);
    }
    if let Ok(e) = endpoint.clone().user_agent(concat!("mesh-client/", env!("CARGO_PKG_VERSION"))) {
        endpoint = e;
    }
    match dial {
        Dial::Plain => endpoint.connect_lazy(),
        Dial::Tls(tls) => {
            // A host that is no valid server name is verified as the IP dialled.
            let connector = tls.connector(&ep.host).or_else(|_| tls.connector(&ep.addr.ip().to_string()));
            match connector {
                Ok(c) => endpoint.connect_with_connector_lazy(c),
                Err(e) => endpoint.connect_with_connector_lazy(refuse(e.to_string().into())),
            }
        }
        Dial::Refuse(why) => endpoint.connect_with_connector_lazy(refuse(why.clone())),
    }
}

/// A connector that fails every attempt with `why`.
fn refuse(
    why: Arc<str>,
) -> impl Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    Error = std::io::Error,
    Future = futures::future::Ready<std::io::Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>>>,
> + Send
+ 'static {
    tower::service_fn(move |_| futures::future::ready(Err(std::io::Error::other(why.to_string()))))
}

impl Service<Request<Body>> for Channel {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = MapOk<StackFuture, fn(Response<StackBody>) -> Response<Body>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let boxed: fn(Response<StackBody>) -> Response<Body> = |r| r.map(Body::new);
        self.stack.call(req).map_ok(boxed)
    }
}
