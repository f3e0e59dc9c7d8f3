//! Owner-only migrations: the roles of the shipped roles.sql, `mesh-audit
//! migrate` as the owner, and the service logged in as the serving role
//! (a member of mesh_audit_writer only) with `MESH_DATABASE_MIGRATE=verify`,
//! as the Kubernetes manifests run them.

use std::time::Duration;

use mesh_proto::audit::{QueryRequest, VerifyRequest, audit_service_client::AuditServiceClient};
use mesh_testkit::{Infra, Process, free_addr};
use sqlx::{Connection as _, PgConnection};

use crate::{
    helpers::{append, event, query_all},
    pg_roles::{Roles, refused, unmigrated_until_the_owner_migrates},
};

const BINARY: &str = env!("CARGO_BIN_EXE_mesh-audit");

fn env(roles: &Roles, role: &str) -> Vec<(String, String)> {
    vec![
        ("MESH_DATABASE_WRITE_URL".into(), roles.url(role)),
        ("MESH_DATABASE_SCHEMA".into(), roles.audit_schema.clone()),
        ("MESH_DATABASE_MIN_CONNECTIONS".into(), "0".into()),
        ("MESH_DATABASE_MIGRATE_TIMEOUT_MS".into(), "1500".into()),
        ("MESH_LISTEN_ADDR".into(), free_addr().to_string()),
        ("MESH_METRICS_ADDR".into(), free_addr().to_string()),
    ]
}

#[tokio::test]
async fn the_serving_role_runs_no_ddl_and_serves_once_the_owner_migrated() {
    let roles = Roles::create(Infra::shared()).await;
    let mut app_env = env(&roles, &roles.audit_app);
    app_env.push(("MESH_DATABASE_MIGRATE".into(), "verify".into()));

    // (a) Unmigrated, the serving role neither serves nor migrates; (b) the owner migrates.
    let owner_env = env(&roles, &roles.audit_owner);
    unmigrated_until_the_owner_migrates(
        BINARY,
        &roles.audit_schema,
        &app_env,
        &env(&roles, &roles.audit_app),
        &owner_env,
        "1, 2, 3",
    )
    .await;

    // (c) The serving role now serves Append, Query and Verify.
    let addr = app_env.iter().find(|(k, _)| k == "MESH_LISTEN_ADDR").unwrap().1.parse().unwrap();
    let mut app = Process::start(BINARY, &app_env).unwrap();
    mesh_testkit::conformance::assert_serving(
        addr,
        &[mesh_proto::audit::SERVICE_NAME],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let mut c = AuditServiceClient::new(mesh_testkit::channel(addr).await);
    append(&mut c, event("roles-a", "document.put"), "k-1").await.unwrap();
    let ack = append(&mut c, event("roles-b", "document.put"), "k-2").await.unwrap();
    let all = query_all(&mut c, QueryRequest { page_size: 100, ..Default::default() }).await;
    assert_eq!(all.len(), 2);
    let v = c.verify(VerifyRequest::default()).await.unwrap().into_inner();
    assert!(v.ok, "{v:?}");
    assert_eq!((v.checked, v.head_hash), (2, ack.hash));
    app.terminate().unwrap();
    assert!(app.wait(Duration::from_secs(30)).await.unwrap().success());

    // (d) As it serves (SET ROLE mesh_audit_writer), the serving role cannot
    // change history or the schema: PostgreSQL refuses each (42501,
    // insufficient privilege, before any trigger runs).
    let mut conn = PgConnection::connect(&roles.url(&roles.audit_app)).await.unwrap();
    sqlx::query(&format!("set search_path = {}", roles.audit_schema)).execute(&mut conn).await.unwrap();
    sqlx::query("set role mesh_audit_writer").execute(&mut conn).await.unwrap();
    for sql in [
        "update audit_events set action = 'forged'",
        "delete from audit_events",
        "truncate audit_events",
        "delete from audit_chain_head",
        "insert into audit_checkpoints select * from audit_checkpoints",
        "drop table audit_events",
        "alter table audit_events disable trigger all",
        "alter table audit_events add column evil int",
        "create table evil (i int)",
        "select audit_drop_partitions_before(now())",
        "drop function audit_refuse_change() cascade",
    ] {
        assert_eq!(refused(&mut conn, sql).await, "42501", "{sql}");
    }
    // Without the SET ROLE (NOINHERIT) it holds nothing at all.
    sqlx::query("reset role").execute(&mut conn).await.unwrap();
    let sql = format!("select count(*) from {}.audit_events", roles.audit_schema);
    assert_eq!(refused(&mut conn, &sql).await, "42501");
    // Nor can it reach data's schema.
    let sql = format!("create table {}.evil (i int)", roles.data_schema);
    assert_eq!(refused(&mut conn, &sql).await, "42501");
    conn.close().await.unwrap();
    drop(roles);
}
