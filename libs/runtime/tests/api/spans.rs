//! Client spans name the server they talk to (`server.address`,
//! `server.port`, OpenTelemetry semantic conventions).

use std::time::Duration;

use mesh_runtime::redis::{self, RedisConfig};
use mesh_testkit::infra::Infra;
use tracing_subscriber::layer::SubscriberExt as _;

/// The fields of `span` as a JSON log line of an event inside it shows them.
fn fields_of(make: impl FnOnce() -> tracing::Span) -> serde_json::Value {
    let buffer = mesh_testkit::LogBuffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer().json().with_current_span(true).with_writer(move || writer.clone()),
    );
    tracing::subscriber::with_default(subscriber, || {
        let span = make();
        let _g = span.enter();
        tracing::info!("inside");
    });
    let out = buffer.text();
    let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    line["span"].clone()
}

fn redis_cli(args: &[&str]) -> String {
    let port = Infra::shared().redis_urls()[0].rsplit(':').next().unwrap().to_owned();
    let out = std::process::Command::new("redis-cli").args(["-p", &port]).args(args).output().unwrap();
    assert!(out.status.success(), "redis-cli {args:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The port of the master serving `slot`, from `CLUSTER NODES`.
fn slot_owner(slot: u16) -> u16 {
    for line in redis_cli(&["cluster", "nodes"]).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 || !f[2].contains("master") {
            continue;
        }
        for range in f[8..].iter().filter(|r| !r.starts_with('[')) {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            if (a.parse::<u16>().unwrap()..=b.parse().unwrap()).contains(&slot) {
                let addr = f[1].split('@').next().unwrap();
                return addr.rsplit(':').next().unwrap().parse().unwrap();
            }
        }
    }
    panic!("no master serves slot {slot}")
}

#[tokio::test]
async fn a_redis_span_names_the_cluster_node_that_owns_the_key() {
    let infra = Infra::shared();
    let pool = redis::connect(&RedisConfig::new(infra.redis_urls(), "spans:")).unwrap();
    assert!(redis::wait_connected(&pool, Duration::from_secs(10)).await);
    let mut owners = std::collections::BTreeSet::new();
    for key in ["spans:a", "spans:b", "spans:c", "spans:{user-7}:sessions", "spans:x", "spans:y"] {
        let slot = redis::slot_of(key);
        assert_eq!(redis_cli(&["cluster", "keyslot", key]).trim(), slot.to_string(), "{key}");
        let owner = slot_owner(slot);
        owners.insert(owner);
        let span = fields_of(|| redis::span_at(pool.next(), "GET", None, slot));
        assert_eq!(span["server.address"], "127.0.0.1", "{key}: {span}");
        assert_eq!(span["server.port"], i64::from(owner), "{key}: {span}");
        assert_eq!(span["db.system.name"], "redis");
    }
    assert!(owners.len() > 1, "the keys chosen span several nodes: {owners:?}");
}
