//! Tests of `mesh-db` against the real PostgreSQL primary and replica:
//! routing, lag exclusion, consistency-token waits, failures, pool metrics.

mod idle;
mod metrics;
mod routing;
mod spans;
mod tls;

use mesh_db::{Db, DbConfig, Lsn, Read, ServedBy};
use prometheus_client::registry::Registry;

/// A Db on `config` with its registry.
pub(crate) fn connect(config: &DbConfig) -> (Db, Registry) {
    let mut registry = Registry::default();
    let db = Db::connect(config, "mesh-db-test", &mut registry).unwrap();
    (db, registry)
}

/// The value of `t.v` (0 if missing) and where it was read, with an optional token.
pub(crate) async fn read_v(db: &Db, at: Option<Lsn>) -> Read<i64> {
    db.read(at, |conn| {
        Box::pin(async move {
            let v: Option<i64> =
                sqlx::query_scalar("select v from t where id = 1").fetch_optional(&mut **conn).await?;
            Ok(v.unwrap_or(0))
        })
    })
    .await
    .unwrap()
}

/// Sets `t.v` on the primary; the consistency token of the write.
pub(crate) async fn write_v(db: &Db, v: i64) -> Lsn {
    let mut conn = db.write().await.unwrap();
    sqlx::query("insert into t (id, v) values (1, $1) on conflict (id) do update set v = excluded.v")
        .bind(v)
        .execute(&mut *conn)
        .await
        .unwrap();
    Db::current_lsn(&mut *conn).await.unwrap()
}

/// Creates table `t` in the configured schema.
pub(crate) async fn create_table(db: &Db) {
    let mut conn = db.write().await.unwrap();
    sqlx::query("create table if not exists t (id int primary key, v bigint not null)")
        .execute(&mut *conn)
        .await
        .unwrap();
}

pub(crate) use mesh_testkit::eventually;

/// `mesh_db_reads_total{served_by, reason}` from `registry`.
pub(crate) fn reads(registry: &Registry, served_by: ServedBy, reason: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    let labels = [format!("served_by=\"{}\"", served_by.as_str()), format!("reason=\"{reason}\"")];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    mesh_testkit::grpc::metric_value(&text, "mesh_db_reads_total", &labels).unwrap_or(0.0)
}
