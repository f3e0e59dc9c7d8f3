//! The typed clients against the real session, rate-limit, audit and data services.

use std::time::{Duration, Instant};

use mesh_client::{
    AuditClient, ClientConfig, ClientMetrics, DataClient, RateLimitClient, SessionClient, config::keys,
};
use mesh_proto::{
    audit::{Actor, AppendRequest, AuditEvent, EventFilter, Outcome, QueryRequest, Resource, Source},
    data::{BatchRequest, DeleteRequest, GetRequest, PutRequest, QueryRequest as DataQuery},
    ratelimit::{CheckRequest, Code as LimitCode, Descriptor, Entry, GetRulesRequest},
    session::{
        ClientInfo, CreateSessionRequest, ListUserSessionsRequest, RefreshSessionRequest,
        RevokeSessionRequest, RevokeUserSessionsRequest, ValidateSessionRequest,
        revoke_session_request::Target,
    },
};
use mesh_runtime::{ServerConfig, grpc::CallContext, trace_context::current_trace_id};
use mesh_testkit::{Infra, Running, TestDb, redis_prefix, spawn};
use secrecy::SecretString;
use tonic::Code;
use tracing::Instrument;

use crate::helpers::{registered_metrics, sample};

/// Waits until a service says it is ready (its dependencies answer): before
/// that, the rate-limit service answers from its failure mode, not Redis.
async fn ready(app: &Running) {
    let ch = mesh_testkit::channel(app.addr).await;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving;
    mesh_testkit::wait_for_health(&ch, "readiness", serving, Duration::from_secs(20)).await.unwrap();
}

/// The real session service, alone (no rate-limit or audit service: these
/// tests are about the clients), once it is ready.
async fn spawn_session() -> Running {
    let config = mesh_session::Config {
        server: ServerConfig::for_tests(),
        redis: Infra::shared().redis_config(&redis_prefix()),
        clients: ClientConfig {
            session: None,
            ratelimit: None,
            audit: None,
            data: None,
            stack: Default::default(),
        },
        session: mesh_session::SessionConfig {
            audit_hash_key: Some("typed-client-test-audit-hash-key".to_owned().into()),
            ..Default::default()
        },
    };
    let app = mesh_session::App::build(config).await.unwrap();
    let app = spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd));
    ready(&app).await;
    app
}

fn config_for(key: &'static str, addr: std::net::SocketAddr) -> ClientConfig {
    let lookup: std::collections::HashMap<&'static str, String> = [(key, format!("http://{addr}"))].into();
    ClientConfig::from_lookup(&lookup).unwrap()
}

#[tokio::test]
async fn the_ratelimit_client_checks_limits_on_the_real_service() {
    let _t = mesh_testkit::init_telemetry();
    let rules = tempfile::tempdir().unwrap();
    let path = rules.path().join("rules.yaml");
    std::fs::write(
        &path,
        "domain: typed\ndescriptors:\n  - key: user\n    rate_limit: { unit: hour, requests_per_unit: 2, name: per_user }\n",
    )
    .unwrap();
    let config = mesh_ratelimit::Config {
        server: ServerConfig::for_tests(),
        redis: Infra::shared().redis_config(&redis_prefix()),
        rules: Some(path),
        engine: mesh_ratelimit::EngineConfig { redis_timeout: Duration::from_secs(2), ..Default::default() },
        audit: None,
    };
    let app = mesh_ratelimit::App::build(config).await.unwrap();
    let app = spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd));
    ready(&app).await;

    let (registry, metrics) = registered_metrics();
    let client = RateLimitClient::from_config(&config_for(keys::RATELIMIT_ADDR, app.addr), &metrics).unwrap();
    let check = CheckRequest {
        domain: "typed".into(),
        descriptors: vec![Descriptor {
            entries: vec![Entry { key: "user".into(), value: "42".into() }],
            hits_addend: None,
        }],
        hits_addend: 0,
    };
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(client.check(check.clone()).await.unwrap().overall_code());
    }
    assert_eq!(codes, [LimitCode::Ok, LimitCode::Ok, LimitCode::OverLimit]);
    let rules = client.get_rules(GetRulesRequest { domain: "typed".into() }).await.unwrap();
    assert_eq!(rules.domain, "typed");
    let err = client.check(CheckRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let ok = [r#"grpc_method="Check""#, r#"grpc_code="OK""#];
    assert_eq!(sample(&registry, "grpc_client_handled_total", &ok), 3.0);
    let bad = [r#"grpc_method="Check""#, r#"grpc_code="INVALID_ARGUMENT""#];
    assert_eq!(sample(&registry, "grpc_client_handled_total", &bad), 1.0);
    // A caller's mistake is no failure of the service.
    assert!(client.channel().endpoints().iter().all(|e| e.state == mesh_tower::BreakerState::Closed));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_session_client_runs_a_session_lifecycle_on_the_real_service() {
    let _t = mesh_testkit::init_telemetry();
    let app = spawn_session().await;

    let (registry, metrics) = registered_metrics();
    let client = SessionClient::from_config(&config_for(keys::SESSION_ADDR, app.addr), &metrics).unwrap();
    let user = format!("typed-{}", redis_prefix());
    let created = client
        .create_session(CreateSessionRequest {
            user_id: user.clone(),
            client: Some(ClientInfo { ip: "10.0.0.9".into(), user_agent: "typed/1".into() }),
            ..Default::default()
        })
        .await
        .unwrap();
    let id = created.session.as_ref().unwrap().id.clone();
    let valid =
        client.validate_session(ValidateSessionRequest { token: created.token.clone(), touch: true }).await;
    assert_eq!(valid.unwrap().session.unwrap().user_id, user);

    // Rotation: the old token is dead at once, the new one works.
    let refreshed = client
        .refresh_session(RefreshSessionRequest { token: created.token.clone(), client: None })
        .await
        .unwrap();
    let old = client.validate_session(ValidateSessionRequest { token: created.token, touch: false }).await;
    assert_eq!(old.unwrap_err().code(), Code::Unauthenticated);
    let listed = client.list_user_sessions(ListUserSessionsRequest { user_id: user.clone() }).await.unwrap();
    assert_eq!(listed.sessions.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);

    let revoked = client
        .revoke_session(RevokeSessionRequest {
            target: Some(Target::Token(refreshed.token.clone())),
            client: None,
        })
        .await
        .unwrap();
    assert!(revoked.revoked);
    let gone = client.validate_session(ValidateSessionRequest { token: refreshed.token, touch: false }).await;
    assert_eq!(gone.unwrap_err().code(), Code::Unauthenticated);

    // UNAUTHENTICATED is an answer, not a failure: sent once each, breakers closed.
    let unauth = [r#"grpc_method="ValidateSession""#, r#"grpc_code="UNAUTHENTICATED""#];
    assert_eq!(sample(&registry, "grpc_client_handled_total", &unauth), 2.0);
    assert_eq!(sample(&registry, "grpc_client_started_total", &[r#"grpc_method="ValidateSession""#]), 3.0);
    assert!(client.channel().endpoints().iter().all(|e| e.state == mesh_tower::BreakerState::Closed));
    app.stop().await.unwrap();
}

fn event() -> AuditEvent {
    AuditEvent {
        actor: Some(Actor { r#type: "service".into(), id: "mesh-client-test".into() }),
        action: "session.create".into(),
        resource: Some(Resource { r#type: "session".into(), id: "s-1".into() }),
        outcome: Outcome::Success as i32,
        source: Some(Source {
            ip: "10.1.2.3".into(),
            user_agent: "test/1".into(),
            service: "mesh-test".into(),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_audit_client_appends_once_per_key_with_the_callers_request_id_and_trace() {
    let _t = mesh_testkit::init_telemetry();
    let db = TestDb::new(Infra::shared()).await.unwrap();
    let config = mesh_audit::Config {
        server: ServerConfig::for_tests(),
        db: db.config.clone(),
        audit: mesh_audit::AuditConfig::default(),
    };
    let app = mesh_audit::App::build(config).await.unwrap();
    let app = spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd));
    ready(&app).await;
    let client =
        AuditClient::from_config(&config_for(keys::AUDIT_ADDR, app.addr), &ClientMetrics::default()).unwrap();

    // As a handler would: inside a call with a request id, inside a trace.
    let span = tracing::info_span!("handler");
    let (first, again, trace_id) = CallContext::new("typed-req-1", None)
        .scope(
            async {
                let req = AppendRequest { event: Some(event()), idempotency_key: "k-1".into() };
                let first = client.append(req.clone()).await.unwrap();
                let again = client.append(req).await.unwrap();
                (first, again, current_trace_id().expect("sampled"))
            }
            .instrument(span),
        )
        .await;
    assert_eq!((first.id.clone(), first.sequence), (again.id, again.sequence), "one event per key");

    let query = QueryRequest {
        filter: Some(EventFilter { actor_id: "mesh-client-test".into(), ..Default::default() }),
        page_size: 10,
        page_token: String::new(),
    };
    let start = Instant::now();
    let events = loop {
        // Served from a replica: poll until it has replayed the append.
        let events = client.query(query.clone()).await.unwrap().events;
        if !events.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id, first.id);
    assert_eq!(events[0].request_id, "typed-req-1");
    assert_eq!(events[0].trace_id, trace_id);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_data_client_sends_its_token_and_repeats_reads_only_on_the_real_service() {
    let _t = mesh_testkit::init_telemetry();
    let session = spawn_session().await;
    let db = TestDb::new(Infra::shared()).await.unwrap();
    // No rate-limit or audit service: this test is about the client.
    let data = mesh_data::App::build(mesh_data::Config {
        server: ServerConfig::for_tests(),
        db: db.config.clone(),
        clients: config_for(keys::SESSION_ADDR, session.addr),
        data: mesh_data::DataConfig::default(),
    })
    .await
    .unwrap();
    let data = spawn(data.local_addr(), data.metrics_addr(), |sd| data.serve(sd));
    ready(&data).await;

    let token =
        SessionClient::from_config(&config_for(keys::SESSION_ADDR, session.addr), &ClientMetrics::default())
            .unwrap()
            .create_session(CreateSessionRequest { user_id: "typed-data".into(), ..Default::default() })
            .await
            .unwrap()
            .token;
    let (registry, metrics) = registered_metrics();
    let plain = DataClient::from_config(&config_for(keys::DATA_ADDR, data.addr), &metrics).unwrap();
    let put = PutRequest {
        collection: "c".into(),
        key: "k".into(),
        document: Some(prost_types::Struct::default()),
        expected_version: Some(0),
    };
    let err = plain.put(put.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let client = plain.with_token(&SecretString::from(token.clone())).unwrap();
    assert!(!format!("{client:?}").contains(&token), "the token stays out of Debug");

    let written = client.put(put.clone()).await.unwrap();
    assert_eq!(written.version, 1);
    let get =
        GetRequest { collection: "c".into(), key: "k".into(), consistency_token: written.consistency_token };
    assert_eq!(client.get(get.clone()).await.unwrap().version, 1);
    // Response metadata through the generated client, with the token added.
    let raw = client.raw().get(client.authorize(get.clone())).await.unwrap();
    assert!(raw.metadata().get("x-mesh-served-by").is_some());
    let page = client.query(DataQuery { collection: "c".into(), ..Default::default() }).await.unwrap();
    assert_eq!(page.documents.len(), 1);
    let gone =
        client.delete(DeleteRequest { collection: "c".into(), key: "k".into(), expected_version: Some(1) });
    assert!(gone.await.unwrap().existed);
    let batch = client.batch(BatchRequest::default()).await.unwrap_err();
    assert_eq!(batch.code(), Code::InvalidArgument, "an empty batch");

    // The session service away: every call is UNAVAILABLE. Get is a read and
    // is repeated; Put would write twice and is sent once.
    session.stop().await.unwrap();
    let retries = |method: &str| {
        sample(&registry, "mesh_client_retries_total", &[&format!("grpc_method=\"{method}\"")])
    };
    assert_eq!(client.get(get).await.unwrap_err().code(), Code::Unavailable);
    assert!(retries("Get") >= 1.0, "Get was not repeated");
    assert_eq!(client.put(put).await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(retries("Put"), 0.0, "Put was repeated");
    data.stop().await.unwrap();
}

#[tokio::test]
async fn revocations_are_repeated_on_unavailable_creations_are_not() {
    let _t = mesh_testkit::init_telemetry();
    // A session service whose Redis is not there: every change is UNAVAILABLE.
    let mut redis = Infra::shared().redis_config(&redis_prefix());
    redis.urls = vec![SecretString::from(mesh_testkit::free_addr().to_string())];
    redis.command_timeout = Duration::from_millis(200);
    redis.connect_timeout = Duration::from_millis(200);
    let config = mesh_session::Config {
        server: ServerConfig::for_tests(),
        redis,
        clients: ClientConfig {
            session: None,
            ratelimit: None,
            audit: None,
            data: None,
            stack: Default::default(),
        },
        session: mesh_session::SessionConfig {
            audit_hash_key: Some("typed-client-test-audit-hash-key".to_owned().into()),
            ..Default::default()
        },
    };
    let app = mesh_session::App::build(config).await.unwrap();
    let app = spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd));

    let (registry, metrics) = registered_metrics();
    let client = SessionClient::from_config(&config_for(keys::SESSION_ADDR, app.addr), &metrics).unwrap();
    let retries = |method: &str| {
        sample(&registry, "mesh_client_retries_total", &[&format!("grpc_method=\"{method}\"")])
    };
    // A well-formed id, from a working instance.
    let working = spawn_session().await;
    let id =
        SessionClient::from_config(&config_for(keys::SESSION_ADDR, working.addr), &ClientMetrics::default())
            .unwrap()
            .create_session(CreateSessionRequest { user_id: "typed-revoke".into(), ..Default::default() })
            .await
            .unwrap()
            .session
            .unwrap()
            .id;
    working.stop().await.unwrap();
    let revoke = RevokeSessionRequest { target: Some(Target::SessionId(id)), client: None };
    assert_eq!(client.revoke_session(revoke).await.unwrap_err().code(), Code::Unavailable);
    assert!(retries("RevokeSession") >= 1.0, "RevokeSession was not repeated");
    let all = RevokeUserSessionsRequest { user_id: "typed-revoke".into(), ..Default::default() };
    assert_eq!(client.revoke_user_sessions(all).await.unwrap_err().code(), Code::Unavailable);
    assert!(retries("RevokeUserSessions") >= 1.0, "RevokeUserSessions was not repeated");
    let create = CreateSessionRequest { user_id: "typed-revoke".into(), ..Default::default() };
    assert_eq!(client.create_session(create).await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(retries("CreateSession"), 0.0, "CreateSession was repeated");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_missing_address_names_its_key() {
    let empty: std::collections::HashMap<&'static str, String> = Default::default();
    let config = ClientConfig::from_lookup(&empty).unwrap();
    let metrics = ClientMetrics::default();
    assert_eq!(RateLimitClient::from_config(&config, &metrics).unwrap_err().key, keys::RATELIMIT_ADDR);
    assert_eq!(AuditClient::from_config(&config, &metrics).unwrap_err().key, keys::AUDIT_ADDR);
    assert_eq!(DataClient::from_config(&config, &metrics).unwrap_err().key, keys::DATA_ADDR);
    assert_eq!(
        mesh_client::SessionClient::from_config(&config, &metrics).unwrap_err().key,
        keys::SESSION_ADDR
    );
}
