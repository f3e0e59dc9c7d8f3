//! Owner-only migrations: the roles of the shipped roles.sql, `mesh-data
//! migrate` as the owner, and the service as the serving role with
//! `MESH_DATABASE_MIGRATE=verify`, as the Kubernetes manifests run them.

use std::time::Duration;

use mesh_db::sqlx::{self, Connection as _};
use mesh_proto::data::{DeleteRequest, GetRequest, PutRequest};
use mesh_testkit::{Infra, LogBuffer, Process, free_addr};
use serde_json::json;

use crate::{
    helpers::{Mesh, OPEN_RULES, client, doc, eventually},
    pg_roles::{Roles, refused, tables_in, unmigrated_until_the_owner_migrates},
};

const BINARY: &str = env!("CARGO_BIN_EXE_mesh-data");

fn env(roles: &Roles, role: &str, mesh: &Mesh) -> Vec<(String, String)> {
    vec![
        ("MESH_DATABASE_WRITE_URL".into(), roles.url(role)),
        ("MESH_DATABASE_SCHEMA".into(), roles.data_schema.clone()),
        ("MESH_DATABASE_MIN_CONNECTIONS".into(), "0".into()),
        ("MESH_DATABASE_MIGRATE_TIMEOUT_MS".into(), "1500".into()),
        ("MESH_LISTEN_ADDR".into(), free_addr().to_string()),
        ("MESH_METRICS_ADDR".into(), free_addr().to_string()),
        ("MESH_SESSION_ADDR".into(), format!("http://{}", mesh.session.addr)),
        ("MESH_RATELIMIT_ADDR".into(), format!("http://{}", mesh.ratelimit.addr)),
        ("MESH_AUDIT_ADDR".into(), format!("http://{}", mesh.audit.addr)),
    ]
}

#[tokio::test]
async fn the_serving_role_runs_no_ddl_and_serves_once_the_owner_migrated() {
    let infra = Infra::shared();
    let roles = Roles::create(infra).await;
    let mesh = Mesh::start(OPEN_RULES).await;
    let mut app_env = env(&roles, &roles.data_app, &mesh);
    app_env.push(("MESH_DATABASE_MIGRATE".into(), "verify".into()));

    // (a) Unmigrated, the serving role neither serves nor migrates; (b) the owner migrates.
    let owner_env = env(&roles, &roles.data_owner, &mesh);
    unmigrated_until_the_owner_migrates(
        BINARY,
        &roles.data_schema,
        &app_env,
        &env(&roles, &roles.data_app, &mesh),
        &owner_env,
        "1, 2",
    )
    .await;

    // A migration applied with other contents is not the binary's either.
    let mut admin = sqlx::PgConnection::connect(&roles.admin_url()).await.unwrap();
    let history = format!("{}._sqlx_migrations", roles.data_schema);
    let sum: Vec<u8> = sqlx::query_scalar(&format!("select checksum from {history} where version = 2"))
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let set_sum = format!("update {history} set checksum = $1 where version = 2");
    sqlx::query(&set_sum).bind(b"other".to_vec()).execute(&mut admin).await.unwrap();
    let output = LogBuffer::default();
    let mut changed = Process::start_captured(BINARY, &app_env, &output).unwrap();
    let status = changed.wait(Duration::from_secs(30)).await.unwrap();
    let text = output.text();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("missing versions [], changed versions [2]"), "{text}");
    sqlx::query(&set_sum).bind(sum).execute(&mut admin).await.unwrap();
    admin.close().await.unwrap();

    // (c) The serving role now serves a full round, the outbox included
    // (delivered to audit and deleted from the outbox).
    let addr = app_env.iter().find(|(k, _)| k == "MESH_LISTEN_ADDR").unwrap().1.parse().unwrap();
    let mut app = Process::start(BINARY, &app_env).unwrap();
    mesh_testkit::conformance::assert_serving(
        addr,
        &[mesh_proto::data::SERVICE_NAME],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let c = client(addr, &mesh.token("roles-user").await);
    let put = |v: i64| PutRequest {
        collection: "orders".into(),
        key: "o-1".into(),
        document: Some(doc(json!({ "n": v }))),
        expected_version: None,
    };
    assert_eq!(c.put(put(1)).await.unwrap().version, 1);
    assert_eq!(c.put(put(2)).await.unwrap().version, 2);
    let got = c
        .get(GetRequest { collection: "orders".into(), key: "o-1".into(), consistency_token: String::new() })
        .await
        .unwrap();
    assert_eq!(got.version, 2);
    c.delete(DeleteRequest { collection: "orders".into(), key: "o-1".into(), expected_version: Some(2) })
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "three events delivered to audit", || async {
        (mesh.audit_events("orders/o-1").await.len() == 3).then_some(())
    })
    .await;
    let owner = sqlx::PgPool::connect(&roles.url(&roles.data_owner)).await.unwrap();
    let count = format!("select count(*) from {}.audit_outbox", roles.data_schema);
    eventually(Duration::from_secs(20), "the outbox emptied by the serving role", || async {
        let n: i64 = sqlx::query_scalar(&count).fetch_one(&owner).await.unwrap();
        (n == 0).then_some(())
    })
    .await;
    app.terminate().unwrap();
    assert!(app.wait(Duration::from_secs(30)).await.unwrap().success());

    // (d) The serving role cannot change the schema: PostgreSQL refuses
    // (42501, insufficient privilege) every DDL and TRUNCATE.
    let mut conn = sqlx::PgConnection::connect(&roles.url(&roles.data_app)).await.unwrap();
    sqlx::query(&format!("set search_path = {}", roles.data_schema)).execute(&mut conn).await.unwrap();
    for sql in [
        "drop table documents",
        "alter table documents add column evil int",
        "truncate audit_outbox",
        "create table evil (i int)",
        "create index evil on documents (version)",
        "create or replace function data_write() returns int language sql as 'select 1'",
        "drop function data_write",
        "create schema evil",
        // The migration history is the owner's: readable, never writable.
        "delete from _sqlx_migrations",
        "update _sqlx_migrations set checksum = ''",
    ] {
        assert_eq!(refused(&mut conn, sql).await, "42501", "{sql}");
    }
    // Nor touch another service's schema.
    let sql = format!("select count(*) from {}.audit_events", roles.audit_schema);
    assert_eq!(refused(&mut conn, &sql).await, "42501");
    assert_eq!(tables_in(&roles.data_schema).await, ["_sqlx_migrations", "audit_outbox", "documents"]);
    conn.close().await.unwrap();
    owner.close().await;
    drop(mesh);
    drop(roles);
}
