//! A Put is one trace across the whole mesh, each service exporting its own
//! spans from its own process: data → session → Redis, data → ratelimit →
//! Redis, data → PostgreSQL, and the audit delivery → audit → PostgreSQL.

use std::time::Duration;

use mesh_proto::data::PutRequest;
use mesh_runtime::telemetry;
use mesh_testkit::{
    Infra, TestDb,
    otlp::{OtlpReceiver, Span},
};
use serde_json::json;
use tracing::Instrument as _;

use crate::{
    helpers::{SERVED, client, doc},
    processes::{redis_env, start, start_ratelimit},
};

fn one<'a>(spans: &'a [Span], what: &str, f: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(found.len(), 1, "{what}: {found:#?}");
    found[0]
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.parent_span_id == parent.span_id).collect()
}

#[tokio::test]
async fn a_put_is_one_trace_across_every_service_redis_and_postgres() {
    let receiver = OtlpReceiver::start().await;
    let telemetry = telemetry::init_for_tests("mesh-data-test", Some(receiver.endpoint()));
    let otlp = receiver.endpoint();
    let infra = Infra::shared();
    let (ratelimit, _rules) = start_ratelimit(infra, &otlp, None).await;
    // No validation cache: the validation goes to Redis, as an uncached one does.
    let mut env = redis_env(infra);
    env.push(("MESH_SESSION_CACHE_MAX_BYTES".into(), "0".into()));
    // Background work runs all along: outbox sweeps here, health rounds everywhere.
    env.push(("MESH_SESSION_OUTBOX_SWEEP_MS".into(), "200".into()));
    let session = start("mesh-session", "mesh.session.v1.SessionService", env, &otlp, None).await;
    let audit_db = TestDb::new(infra).await.unwrap();
    let audit = start(
        "mesh-audit",
        "mesh.audit.v1.AuditService",
        infra.env(&audit_db.schema, "unused:"),
        &otlp,
        None,
    )
    .await;
    let data_db = TestDb::new(infra).await.unwrap();
    let mut env = infra.env(&data_db.schema, "unused:");
    env.extend([
        ("MESH_SESSION_ADDR".into(), session.addr.to_string()),
        ("MESH_RATELIMIT_ADDR".into(), ratelimit.addr.to_string()),
        ("MESH_AUDIT_ADDR".into(), audit.addr.to_string()),
    ]);
    let data = start("mesh-data", SERVED[0], env, &otlp, None).await;

    let mut sessions = mesh_proto::session::session_service_client::SessionServiceClient::new(
        mesh_testkit::channel(session.addr).await,
    );
    let token = sessions
        .create_session(mesh_proto::session::CreateSessionRequest {
            user_id: "olivia".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let c = client(data.addr, &token);
    let root = tracing::info_span!("checkout");
    let put = c
        .raw()
        .put(c.authorize(PutRequest {
            collection: "carts".into(),
            key: "c-1".into(),
            document: Some(doc(json!({"items": 3}))),
            expected_version: None,
        }))
        .instrument(root)
        .await
        .unwrap();
    // The answer names its trace (W3C `traceresponse`): what a caller looks up.
    let traceresponse =
        put.metadata().get("traceresponse").expect("traceresponse").to_str().unwrap().to_owned();
    // The audit event is delivered after the Put answered: wait for it, then
    // let every process drain and flush.
    let filter = mesh_proto::audit::EventFilter { resource_id: "carts/c-1".into(), ..Default::default() };
    crate::helpers::eventually(Duration::from_secs(20), "the audit event", || {
        let filter = filter.clone();
        let addr = audit.addr;
        async move { (!crate::helpers::audit_events(addr, filter).await.is_empty()).then_some(()) }
    })
    .await;
    for s in [data, session, ratelimit, audit] {
        s.stop().await;
    }
    telemetry.flush().await;

    let spans = receiver
        .wait_for(Duration::from_secs(15), |s| {
            s.iter().any(|s| s.name == "checkout")
                && s.iter()
                    .any(|s| s.service == "mesh-audit" && s.attr("db.system.name") == Some("postgresql"))
        })
        .await;
    let root = one(&spans, "the test's root span", |s| s.name == "checkout");
    // Only calls start traces in a service: no root from background work
    // (health rounds, outbox sweeps, replica polls) and none from health
    // probes; their spans are not exported at all.
    for s in spans.iter().filter(|s| s.service.starts_with("mesh-") && s.service != "mesh-data-test") {
        let mut top = s;
        while let Some(p) =
            spans.iter().find(|p| p.span_id == top.parent_span_id && p.trace_id == top.trace_id)
        {
            top = p;
        }
        assert!(
            (top.kind == 2 && !top.name.starts_with("grpc.health.v1.Health/")) || top.name == "checkout",
            "{} span {:?} is in a trace no call started (its top: {} {:?}, kind {})",
            s.service,
            s.name,
            top.service,
            top.name,
            top.kind
        );
    }
    let trace: Vec<Span> = spans.iter().filter(|s| s.trace_id == root.trace_id).cloned().collect();
    let server = |svc: &str, method: &str| {
        one(&trace, &format!("{svc} server span"), |s| {
            s.service == svc && s.kind == 2 && s.name.ends_with(method)
        })
    };
    let put = server("mesh-data", "/Put");
    assert_eq!(traceresponse, format!("00-{}-{}-01", root.trace_id, put.span_id));
    let validate = server("mesh-session", "/ValidateSession");
    let check = server("mesh-ratelimit", "/Check");
    let append = server("mesh-audit", "/Append");

    // data → session → Redis; data → ratelimit → Redis: client span, then the server span under it.
    for (callee, method) in [(validate, "ValidateSession"), (check, "Check")] {
        let client_span = trace.iter().find(|s| s.span_id == callee.parent_span_id).expect("a client span");
        assert_eq!((client_span.service.as_str(), client_span.kind), ("mesh-data", 3), "{method}");
        assert_eq!(client_span.parent_span_id, put.span_id, "{method} is called by the Put");
        let redis = trace.iter().filter(|s| s.attr("db.system.name") == Some("redis"));
        assert!(
            redis.clone().any(|r| r.service == callee.service && descends(&trace, r, callee)),
            "{method}: no redis span under it"
        );
    }
    // data → PostgreSQL, with the database attributes.
    let pg: Vec<&Span> = children(&trace, put)
        .into_iter()
        .filter(|s| s.attr("db.system.name") == Some("postgresql"))
        .collect();
    assert!(!pg.is_empty(), "no postgres span under the Put: {:#?}", children(&trace, put));
    for s in &pg {
        assert_eq!(s.kind, 3);
        assert!(s.attr("db.operation.name").is_some(), "{s:#?}");
        assert_eq!(s.attr("server.address"), Some("127.0.0.1"));
        assert_eq!(s.int_attr("server.port"), Some(i64::from(infra.pg_primary_port)));
    }
    // The audit delivery joins the Put's trace, and goes on into the audit service's PostgreSQL.
    let delivery = one(&trace, "the delivery span", |s| s.name == "deliver audit event");
    assert_eq!(delivery.parent_span_id, put.span_id);
    assert!(descends(&trace, append, delivery), "the Append is under the delivery");
    assert!(
        trace.iter().any(|s| s.service == "mesh-audit"
            && s.attr("db.system.name") == Some("postgresql")
            && descends(&trace, s, append)),
        "no postgres span under the Append"
    );
    telemetry.shutdown().await;
}

/// Whether `s` is below `ancestor` in `trace`.
fn descends(trace: &[Span], s: &Span, ancestor: &Span) -> bool {
    let mut cur = s;
    for _ in 0..64 {
        if cur.parent_span_id == ancestor.span_id {
            return true;
        }
        match trace.iter().find(|p| p.span_id == cur.parent_span_id) {
            Some(p) => cur = p,
            None => return false,
        }
    }
    false
}
