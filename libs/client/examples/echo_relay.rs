//! A mesh service that calls another one through `mesh-client`: an echo
//! server on the mesh runtime that can relay every call to a next hop and
//! touch the Redis Cluster on the way. It is also the killable process the
//! client's integration tests run (one per instance, SIGKILLed at will).
//!
//! Environment: the runtime's (`MESH_LISTEN_ADDR`, `MESH_METRICS_ADDR`,
//! `OTEL_*`, `RUST_LOG`), the client's (`MESH_CLIENT_*`), and:
//! - `MESH_ECHO_NAME`: this hop's name in answers (default `echo`);
//! - `MESH_ECHO_NEXT_ADDR`: relay each call to the echo service there;
//! - `MESH_REDIS_URLS` (and `MESH_REDIS_KEY_PREFIX`): count each call in Redis.
//!
//! Each hop puts a line `<name> budget_ms=<its grpc-timeout> request_id=<id>`
//! before the payload it returns; `delay_ms` is slept at the first hop only.
//!
//! Request metadata makes the first hop refuse instead (for the client's
//! breaker and retry tests): `x-echo-code: <n>` answers gRPC code `n`,
//! with `grpc-retry-pushback-ms` set to `x-echo-pushback` when given and a
//! `google.rpc.RetryInfo` of `x-echo-retry-delay-ms` when given.

use std::{process::ExitCode, time::Duration};

use fred::{clients::Pool, interfaces::KeysInterface};
use mesh_client::{Channel, ClientMetrics, StackConfig, config::target_from_lookup};
use mesh_runtime::{
    ConfigError, EXIT_CONFIG, Env, LookupExt, Server, ServerConfig, Telemetry, TelemetryConfig,
    grpc::{GRPC_TIMEOUT, parse_grpc_timeout, request_id_of},
    redis::{self, RedisConfig},
    shutdown_signal,
};
use mesh_testkit::echo::{EchoRequest, EchoResponse, EchoService, EchoServiceClient, EchoServiceServer};
use tonic::{
    Code, Request, Response, Status,
    metadata::{MetadataMap, MetadataValue},
};
use tonic_types::{ErrorDetails, StatusExt as _};
use tracing::Instrument;

const ECHO: &str = "/mesh.testkit.echo.v1.EchoService/Echo";

struct Relay {
    name: String,
    next: Option<EchoServiceClient<Channel>>,
    redis: Option<(Pool, String)>,
}

#[tonic::async_trait]
impl EchoService for Relay {
    async fn echo(&self, req: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let budget = req
            .metadata()
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or_else(|| "none".to_owned(), |d| format!("{:.3}", d.as_secs_f64() * 1000.0));
        if let Some(status) = refusal(req.metadata()) {
            return Err(status);
        }
        let rid = request_id_of(&req).unwrap_or_default();
        let line = format!("{} budget_ms={budget} request_id={rid}\n", self.name);
        if let Some((pool, prefix)) = &self.redis {
            let key = format!("{prefix}echo:calls");
            let _: i64 = pool
                .next()
                .incr(&key)
                .instrument(redis::span("INCR", None))
                .await
                .map_err(|e| Status::unavailable(format!("redis: {}", e.details())))?;
        }
        let req = req.into_inner();
        if req.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(req.delay_ms))).await;
        }
        // Through the mesh client: this call inherits the handler's deadline,
        // request id and trace.
        let rest = match &self.next {
            Some(next) => {
                let down = EchoRequest { payload: req.payload, delay_ms: 0 };
                next.clone().echo(down).await?.into_inner().payload
            }
            None => req.payload,
        };
        Ok(Response::new(EchoResponse { payload: [line.into_bytes(), rest].concat() }))
    }
}

/// The refusal the request's metadata asks for (module docs).
fn refusal(md: &MetadataMap) -> Option<Status> {
    let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let code = Code::from_i32(get("x-echo-code")?.parse().ok()?);
    let details = match get("x-echo-retry-delay-ms").and_then(|v| v.parse::<u64>().ok()) {
        Some(ms) => ErrorDetails::with_retry_info(Some(Duration::from_millis(ms))),
        None => ErrorDetails::new(),
    };
    let mut status = Status::with_error_details(code, "refused as the request asked", details);
    if let Some(v) = get("x-echo-pushback").and_then(|v| v.parse::<MetadataValue<_>>().ok()) {
        status.metadata_mut().insert(mesh_tower::PUSHBACK, v);
    }
    Some(status)
}

async fn build() -> Result<Server, ConfigError> {
    let mut server = Server::bind(ServerConfig::from_lookup(&Env, 50099)?)
        .await
        .map_err(|e| ConfigError::new("MESH_LISTEN_ADDR", e.to_string()))?;
    let metrics = ClientMetrics::register(server.registry());
    let next = target_from_lookup(&Env, "MESH_ECHO_NEXT_ADDR")?.map(|target| {
        let channel = Channel::builder("echo", target)
            .config(StackConfig::from_lookup(&Env)?)
            .metrics(&metrics)
            .idempotent([ECHO])
            .build();
        Ok::<_, ConfigError>(EchoServiceClient::new(channel))
    });
    let redis = match Env.string(redis::keys::URLS) {
        None => None,
        Some(_) => {
            let config = RedisConfig::from_lookup(&Env)?;
            let pool = redis::connect(&config)?;
            server.add_check(redis::check(&pool));
            Some((pool, config.key_prefix))
        }
    };
    let relay = Relay {
        name: Env.string("MESH_ECHO_NAME").unwrap_or_else(|| "echo".to_owned()),
        next: next.transpose()?,
        redis,
    };
    server
        .add_service(EchoServiceServer::new(relay))
        .add_descriptor_set(mesh_testkit::echo::FILE_DESCRIPTOR_SET);
    Ok(server)
}

#[tokio::main]
async fn main() -> ExitCode {
    let telemetry = match TelemetryConfig::from_lookup(&Env, "mesh-echo") {
        Ok(c) => Telemetry::init(&c),
        Err(e) => {
            eprintln!("bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let server = match build().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "bad configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = server.serve(shutdown_signal()).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serve failed: {e}");
            ExitCode::FAILURE
        }
    }
}
