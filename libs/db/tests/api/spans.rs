//! Statement spans name the server (`server.address`, `server.port`).

use tracing_subscriber::layer::SubscriberExt as _;

#[tokio::test]
async fn a_statement_span_on_a_pool_names_the_server_it_connects_to() {
    let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://u:p@db.example:6543/x").unwrap();
    let buffer = mesh_testkit::LogBuffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer().json().with_current_span(true).with_writer(move || writer.clone()),
    );
    tracing::subscriber::with_default(subscriber, || {
        let span = mesh_db::span_on(&pool, "SELECT", "t", "select v from t where id = $1");
        let _g = span.enter();
        tracing::info!("inside");
    });
    let out = buffer.text();
    let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let span = &line["span"];
    assert_eq!(span["server.address"], "db.example", "{out}");
    assert_eq!(span["server.port"], 6543, "{out}");
    assert_eq!(span["db.system.name"], "postgresql", "{out}");
    assert_eq!(span["db.collection.name"], "t", "{out}");
    assert!(!out.contains(":p@"), "no password in spans: {out}");
}
