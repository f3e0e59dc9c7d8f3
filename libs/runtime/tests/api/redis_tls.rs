//! `rediss://`: a Redis Cluster of TLS-only nodes (redis-server with
//! `--port 0 --tls-port`, certificates from a [`TestPki`] CA), reached through
//! `mesh_runtime::redis` with the right CA, a wrong CA, and plaintext.
//! Needs `redis-server` and `redis-cli` built with TLS (Debian's are).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use fred::interfaces::{ClientLike as _, KeysInterface as _};
use mesh_runtime::redis::{self, RedisConfig};
use mesh_testkit::tls::TestPki;
use secrecy::SecretString;

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("mesh-redis-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One TLS-only cluster node; killed on drop.
struct Node {
    port: u16,
    bus: u16,
    _child: tokio::process::Child,
}

fn start_node(dir: &Path) -> Node {
    let port = mesh_testkit::free_addr().port();
    let bus = mesh_testkit::free_addr().port();
    let node_dir = dir.join(format!("node-{port}"));
    std::fs::create_dir_all(&node_dir).unwrap();
    let child = tokio::process::Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--cluster-port", &bus.to_string()])
        .arg("--tls-cert-file")
        .arg(dir.join("server.pem"))
        .arg("--tls-key-file")
        .arg(dir.join("server-key.pem"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.pem"))
        .args(["--tls-auth-clients", "no", "--tls-cluster", "yes", "--tls-replication", "yes"])
        .args(["--cluster-enabled", "yes", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&node_dir)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server starts");
    Node { port, bus, _child: child }
}

async fn cli(dir: &Path, port: u16, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("redis-cli")
        .args(["--tls", "--cacert"])
        .arg(dir.join("ca.pem"))
        .args(["-h", "localhost", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Three TLS-only masters sharing the 16384 slots, `cluster_state:ok` on each,
/// presenting `server.pem` / `server-key.pem` for `localhost` (no IP SAN:
/// cluster nodes announced by IP must be verified against the seed's host
/// name; also for client use, which the TLS cluster bus requires) signed by
/// CA `ca.pem` in `dir`.
async fn tls_cluster(dir: &Path) -> Vec<Node> {
    TestPki::new(dir).issue_dns_only("server", "localhost");
    let nodes: Vec<Node> = (0..3).map(|_| start_node(dir)).collect();
    for n in &nodes {
        mesh_testkit::eventually(Duration::from_secs(10), "node answers over TLS", || async {
            cli(dir, n.port, &["ping"]).await.ok().filter(|o| o.contains("PONG"))
        })
        .await;
    }
    let ranges = [("0", "5460"), ("5461", "10922"), ("10923", "16383")];
    for (n, (from, to)) in nodes.iter().zip(ranges) {
        cli(dir, n.port, &["cluster", "addslotsrange", from, to]).await.unwrap();
    }
    for n in &nodes[1..] {
        cli(dir, nodes[0].port, &["cluster", "meet", "127.0.0.1", &n.port.to_string(), &n.bus.to_string()])
            .await
            .unwrap();
    }
    for n in &nodes {
        mesh_testkit::eventually(Duration::from_secs(20), "cluster_state:ok on every node", || async {
            cli(dir, n.port, &["cluster", "info"]).await.ok().filter(|o| o.contains("cluster_state:ok"))
        })
        .await;
    }
    nodes
}

fn config(url: String, ca: Option<PathBuf>) -> RedisConfig {
    RedisConfig { ca_file: ca, ..RedisConfig::new([url], "mesh:tls-test:") }
}

#[tokio::test]
async fn rediss_reaches_a_tls_cluster_only_with_the_servers_ca() {
    let dir = TempDir::new();
    let nodes = tls_cluster(&dir.0).await;
    let seed = format!("localhost:{}", nodes[0].port);

    // The right CA: every node's slots are reachable (keys on all three
    // masters), verified against the seed's host name although CLUSTER SLOTS
    // names the other nodes by IP.
    let pool = redis::connect(&config(format!("rediss://{seed}"), Some(dir.0.join("ca.pem")))).unwrap();
    assert!(
        redis::wait_connected(&pool, Duration::from_secs(10)).await,
        "rediss:// with the right CA connects"
    );
    let client = pool.next();
    let mut slots = std::collections::BTreeSet::new();
    for i in 0..30 {
        let key = format!("mesh:tls-test:{i}");
        slots.insert(redis::slot_of(&key) / 5461);
        let _: () = client.set(&key, i, None, None, false).await.unwrap();
        let v: i64 = client.get(&key).await.unwrap();
        assert_eq!(v, i);
    }
    assert_eq!(slots.len(), 3, "keys spread over the three masters");
    pool.quit().await.ok();

    // A CA that did not sign the servers' certificate: never connected, and
    // the dependency check fails.
    let other_ca = TestPki::new(dir.0.join("other-ca")).ca_path();
    let wrong = redis::connect(&config(format!("rediss://{seed}"), Some(other_ca))).unwrap();
    assert!(!redis::wait_connected(&wrong, Duration::from_secs(3)).await, "a wrong CA is refused");
    let r: Result<Option<String>, _> = wrong.next().get("mesh:tls-test:0").await;
    assert!(r.is_err(), "a command without a verified connection fails");
    wrong.quit().await.ok();

    // Plaintext to a TLS port: never connected.
    let plain = redis::connect(&config(format!("redis://{seed}"), None)).unwrap();
    assert!(!redis::wait_connected(&plain, Duration::from_secs(3)).await, "plaintext to a TLS port fails");
    plain.quit().await.ok();
}

#[test]
fn tls_settings_that_cannot_work_are_refused_at_start() {
    let mixed = RedisConfig::new(["rediss://a:6379", "redis://b:6379"], "p:");
    let e = redis::connect(&mixed).unwrap_err();
    assert!(e.to_string().contains("mixes rediss://"), "{e}");

    let ca_without_tls =
        RedisConfig { ca_file: Some("/nonexistent.pem".into()), ..RedisConfig::new(["a:6379"], "p:") };
    let e = redis::connect(&ca_without_tls).unwrap_err();
    assert!(e.to_string().contains("MESH_REDIS_CA_FILE"), "{e}");

    let secret = "s3cret-password";
    let missing_ca = RedisConfig {
        ca_file: Some("/nonexistent/ca.pem".into()),
        urls: vec![SecretString::from(format!("rediss://u:{secret}@a:6379"))],
        ..RedisConfig::new(Vec::<String>::new(), "p:")
    };
    let e = redis::connect(&missing_ca).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/ca.pem") && !e.contains(secret), "{e}");

    let other_scheme = RedisConfig::new(["http://a:6379"], "p:");
    assert!(redis::connect(&other_scheme).is_err());
}
