//! Every PostgreSQL client span the service exports names the server it ran
//! on (`server.address`, `server.port`, OpenTelemetry database semantic
//! conventions), whether the statement ran on a pool, on the batch task's
//! own connection, or in Verify's transaction; and none carries credentials.

use std::time::Duration;

use mesh_proto::audit::{QueryRequest, VerifyRequest};
use mesh_runtime::telemetry;
use mesh_testkit::{Infra, otlp::OtlpReceiver};

use crate::helpers::{Fixture, append, event, query_all};

#[tokio::test]
async fn every_postgres_span_of_append_query_and_verify_names_its_server() {
    let receiver = OtlpReceiver::start().await;
    let telemetry = telemetry::init_for_tests("mesh-audit-test", Some(receiver.endpoint()));
    let infra = Infra::shared();
    let mut f = Fixture::new().await;

    // exact path (no head yet), fast path, then a repeated key (exact path again)
    let first = append(&mut f.client, event("ada", "login"), "k-1").await.unwrap();
    append(&mut f.client, event("bob", "login"), "k-2").await.unwrap();
    let again = append(&mut f.client, event("ada", "login"), "k-1").await.unwrap();
    assert_eq!(again.sequence, first.sequence);
    assert_eq!(query_all(&mut f.client, QueryRequest::default()).await.len(), 2);
    // from 2: anchored on the stored hash of event 1
    let v = f.client.verify(VerifyRequest { from_sequence: 2, to_sequence: 0 }).await.unwrap().into_inner();
    assert!(v.ok, "{v:?}");
    let v = f.client.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok, "{v:?}");
    telemetry.flush().await;

    let statements = [
        "SELECT audit_chain_head",        // begin_locked, head_and_keys, read_head
        "INSERT audit_events",            // insert_batch
        "SELECT pg_logical_emit_message", // the flusher
        "SELECT audit_partitions",        // ensure_partition
        "SELECT audit_events",            // Query, Verify's rows and anchor hash
        "SELECT audit_checkpoints",       // Verify
    ];
    let postgres = |spans: &[mesh_testkit::otlp::Span]| -> Vec<mesh_testkit::otlp::Span> {
        spans.iter().filter(|s| s.attr("db.system.name") == Some("postgresql")).cloned().collect()
    };
    let spans = receiver
        .wait_for(Duration::from_secs(15), |s| {
            let pg = postgres(s);
            statements.iter().all(|name| pg.iter().any(|s| s.name == *name))
        })
        .await;
    let pg = postgres(&spans);
    for name in statements {
        assert!(pg.iter().any(|s| s.name == name), "no {name:?} span among {pg:#?}");
    }

    let ports = [infra.pg_primary_port.to_string(), infra.pg_replica_port.to_string()];
    for s in &pg {
        assert_eq!(s.attr("server.address"), Some("127.0.0.1"), "{s:#?}");
        let port = s.attr("server.port").unwrap_or_else(|| panic!("no server.port: {s:#?}"));
        assert!(ports.iter().any(|p| p == port), "server.port {port} is neither server's: {s:#?}");
        if s.attr("db.operation.name") == Some("INSERT") {
            assert_eq!(port, ports[0], "writes go to the primary: {s:#?}");
        }
        for (k, v) in &s.attributes {
            assert!(
                !v.contains("postgres://") && !v.contains('@') && !k.contains("password"),
                "credentials in a span attribute {k}={v}: {s:#?}"
            );
        }
    }
}
