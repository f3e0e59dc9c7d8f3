//! Admin RPCs (Verify, Export) only for `MESH_ADMIN_IDENTITIES`, refusals
//! audited in this service's own log, and `source.service` taken from the
//! caller's certificate under TLS — over real mutual TLS.

use std::{net::SocketAddr, time::Duration};

use futures::StreamExt as _;
use mesh_proto::audit::{
    EventFilter, ExportRequest, Outcome, QueryRequest, VerifyRequest,
    audit_service_client::AuditServiceClient,
};
use mesh_runtime::authz::AdminIdentities;
use mesh_testkit::{Infra, Running, TestDb, tls::TestPki};
use tonic::{Code, transport::Channel};

use crate::helpers::{Fixture, append, config_for, event, eventually, query_all, spawn_app};

const AUDIT: &str = "spiffe://mesh.local/ns/default/sa/audit";
const OPS: &str = "spiffe://mesh.local/ns/default/sa/ops";
const DATA: &str = "spiffe://mesh.local/ns/default/sa/data";

/// A client presenting a certificate for `spiffe_id`, issued by `pki`.
async fn tls_client(
    pki: &TestPki,
    name: &str,
    spiffe_id: &str,
    addr: SocketAddr,
) -> AuditServiceClient<Channel> {
    AuditServiceClient::new(pki.channel(name, spiffe_id, addr).await)
}

fn admins(ids: &[&str]) -> AdminIdentities {
    AdminIdentities(Some(ids.iter().map(|s| (*s).to_owned()).collect()))
}

/// An audit service with TLS, `OPS` its only admin; clients as ops and as data.
async fn tls_fixture(
    dir: &std::path::Path,
) -> (TestDb, Running, AuditServiceClient<Channel>, AuditServiceClient<Channel>) {
    let pki = TestPki::new(dir);
    let db = TestDb::new(Infra::shared()).await.expect("test schema");
    let mut config = config_for(&db);
    config.server.tls = Some(pki.tls_config("audit", AUDIT));
    config.server.admin_identities = admins(&[OPS]);
    let app = spawn_app(config).await;
    let ops = tls_client(&pki, "ops", OPS, app.addr).await;
    let data = tls_client(&pki, "data", DATA, app.addr).await;
    (db, app, ops, data)
}

async fn export_all(client: &mut AuditServiceClient<Channel>) -> Result<String, tonic::Status> {
    let mut stream = client.export(ExportRequest::default()).await?.into_inner();
    let mut lines = String::new();
    while let Some(chunk) = stream.next().await {
        lines.push_str(&chunk?.lines);
    }
    Ok(lines)
}

/// The `authz.denied` events in the log.
async fn denials(client: &mut AuditServiceClient<Channel>) -> Vec<mesh_proto::audit::AuditEvent> {
    let filter = EventFilter { action: "authz.denied".into(), ..Default::default() };
    query_all(client, QueryRequest { filter: Some(filter), ..Default::default() }).await
}

#[tokio::test]
async fn admin_rpcs_are_only_for_listed_identities_and_every_refusal_is_audited() {
    let _t = mesh_testkit::init_telemetry();
    let dir = tempfile::tempdir().unwrap();
    let (_db, app, mut ops, mut data) = tls_fixture(dir.path()).await;
    append(&mut data, event("alice", "document.read"), "k1").await.unwrap();

    // The admin may.
    let v = ops.verify(VerifyRequest::default()).await.expect("admin verifies").into_inner();
    assert!(v.ok && v.checked >= 1, "{v:?}");
    assert!(export_all(&mut ops).await.expect("admin exports").contains("document.read"));

    // Anyone else is refused, naming the RPC and the caller, nothing more.
    let e = data.verify(VerifyRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("/mesh.audit.v1.AuditService/Verify") && e.message().contains(DATA),
        "{e:?}"
    );
    let e = export_all(&mut data).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Both refusals are in the log, as DENIED by the data identity.
    let found = eventually(Duration::from_secs(10), "both refusals audited", || {
        let mut c = ops.clone();
        async move {
            let d = denials(&mut c).await;
            (d.len() == 2).then_some(d)
        }
    })
    .await;
    let mut rpcs: Vec<String> = found.iter().map(|e| e.resource.clone().unwrap().id).collect();
    rpcs.sort();
    assert_eq!(rpcs, ["/mesh.audit.v1.AuditService/Export", "/mesh.audit.v1.AuditService/Verify"]);
    for e in &found {
        assert_eq!(e.outcome, Outcome::Denied as i32);
        assert_eq!(e.actor.as_ref().unwrap().id, DATA);
        assert_eq!(e.source.as_ref().unwrap().service, "mesh-audit");
    }
    let m = mesh_testkit::scrape_metrics(app.metrics_addr).await.unwrap();
    let denied = |method| {
        mesh_testkit::grpc::metric_value(
            &m,
            "mesh_authz_denied_total",
            &[&format!("grpc_method=\"{method}\"")],
        )
    };
    assert_eq!((denied("Verify"), denied("Export")), (Some(1.0), Some(1.0)), "{m}");
}

#[tokio::test]
async fn under_tls_the_source_service_is_the_callers_certificate_identity() {
    let _t = mesh_testkit::init_telemetry();
    let dir = tempfile::tempdir().unwrap();
    let (_db, _app, mut ops, mut data) = tls_fixture(dir.path()).await;
    // data claims to be the session service; the certificate says otherwise.
    let mut claimed = event("bob", "document.write");
    claimed.source.as_mut().unwrap().service = "mesh-session".into();
    let first = append(&mut data, claimed.clone(), "same-key").await.unwrap();
    // The same key from another identity is another scope: another row.
    let second = append(&mut ops, claimed, "same-key").await.unwrap();
    assert_ne!(first.sequence, second.sequence);

    let filter = EventFilter { actor_id: "bob".into(), ..Default::default() };
    let events = eventually(Duration::from_secs(10), "both appends readable", || {
        let mut c = ops.clone();
        let filter = filter.clone();
        async move {
            let e = query_all(&mut c, QueryRequest { filter: Some(filter), ..Default::default() }).await;
            (e.len() == 2).then_some(e)
        }
    })
    .await;
    let mut sources: Vec<String> = events.iter().map(|e| e.source.clone().unwrap().service).collect();
    sources.sort();
    assert_eq!(sources, [DATA, OPS]);
}

#[tokio::test]
async fn without_tls_admin_rpcs_are_open_only_while_no_admins_are_configured() {
    let _t = mesh_testkit::init_telemetry();
    // Local development: nothing configured, anyone may.
    let mut open = Fixture::new().await;
    assert!(open.client.verify(VerifyRequest::default()).await.is_ok());
    assert!(export_all(&mut open.client).await.is_ok());
    // The claimed source stands: nothing proves otherwise.
    let mut claimed = event("carol", "document.read");
    claimed.source.as_mut().unwrap().service = "mesh-claimed".into();
    append(&mut open.client, claimed, "k").await.unwrap();
    let filter = EventFilter { actor_id: "carol".into(), ..Default::default() };
    let e = eventually(Duration::from_secs(10), "append readable", || {
        let mut c = open.client.clone();
        let filter = filter.clone();
        async move {
            let e = query_all(&mut c, QueryRequest { filter: Some(filter), ..Default::default() }).await;
            e.into_iter().next()
        }
    })
    .await;
    assert_eq!(e.source.unwrap().service, "mesh-claimed");

    // Admins configured but no TLS: no caller has an identity, all refused, audited.
    let mut closed = Fixture::with(|c| c.server.admin_identities = admins(&[OPS])).await;
    let e = closed.client.verify(VerifyRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("without TLS"), "{e:?}");
    let found = eventually(Duration::from_secs(10), "refusal audited", || {
        let mut c = closed.client.clone();
        async move { denials(&mut c).await.into_iter().next() }
    })
    .await;
    assert_eq!(found.actor.unwrap().id, "anonymous");
    assert_eq!(found.resource.unwrap().id, "/mesh.audit.v1.AuditService/Verify");
}
