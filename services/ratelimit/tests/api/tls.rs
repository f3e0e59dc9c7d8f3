//! Mutual TLS on the API port: required, enforced, reloaded without a
//! restart; plaintext health for probes on its own port; the mesh client
//! dials it.

use std::{collections::HashMap, net::SocketAddr, path::Path, time::Duration};

use mesh_proto::ratelimit::{CheckRequest, Code, rate_limit_service_client::RateLimitServiceClient};
use mesh_runtime::{ServerConfig, tls::TlsConfig};
use mesh_testkit::{
    Infra, Process, eventually, free_addr, health_status,
    tls::{TestPki, channel, channel_without_certificate, plaintext_channel, refused_by_transport},
};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{config, desc, spawn_app};

const SERVER_ID: &str = "spiffe://mesh.local/ns/default/sa/ratelimit";
const CALLER_ID: &str = "spiffe://mesh.local/ns/default/sa/data";
const WAIT: Duration = Duration::from_secs(20);

/// One Check over `ch`: `Ok` when it was answered.
async fn call(ch: Channel) -> Result<Code, tonic::Status> {
    let req = CheckRequest {
        domain: "tls-test".into(),
        descriptors: vec![desc(&[("k", "v")], None)],
        hits_addend: 0,
    };
    let resp = RateLimitServiceClient::new(ch).check(req).await?;
    Ok(resp.into_inner().overall_code())
}

/// The service with TLS from `tls` and plaintext health on `health`.
async fn spawn_tls(tls: TlsConfig, health: SocketAddr) -> mesh_testkit::Running {
    let mut c = config(Infra::shared());
    c.server = ServerConfig { tls: Some(tls), health_listen_addr: Some(health), ..ServerConfig::for_tests() };
    spawn_app(c).await
}

#[tokio::test]
async fn the_api_port_requires_a_certificate_from_the_trusted_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path().join("a"));
    let other = TestPki::new(dir.path().join("b"));
    let health = free_addr();
    let app = spawn_tls(pki.tls_config("ratelimit", SERVER_ID), health).await;

    let caller = pki.tls_config("data", CALLER_ID);
    let code = eventually(WAIT, "a caller with a certificate is answered", || {
        let ch = channel(&caller, app.addr);
        async move { call(ch).await.ok() }
    })
    .await;
    assert_eq!(code, Code::Ok);

    let refused = [
        ("plaintext", plaintext_channel(app.addr)),
        ("no client certificate", channel_without_certificate(&pki.ca_path(), app.addr)),
        ("a certificate from another CA", {
            let stranger = other.tls_config("data", CALLER_ID);
            let trusting = TlsConfig { ca_file: pki.ca_path(), ..stranger };
            channel(&trusting, app.addr)
        }),
    ];
    for (what, ch) in refused {
        let err = call(ch).await.expect_err(what);
        assert!(refused_by_transport(&err), "{what}: {err}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn probes_reach_health_in_plaintext_on_their_own_port_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let health = free_addr();
    let app = spawn_tls(pki.tls_config("ratelimit", SERVER_ID), health).await;

    let probe = plaintext_channel(health);
    let status = eventually(WAIT, "plaintext readiness is SERVING", || {
        let probe = probe.clone();
        async move { health_status(&probe, "readiness").await.ok().filter(|s| *s == ServingStatus::Serving) }
    })
    .await;
    assert_eq!(status, ServingStatus::Serving);
    // Only health there: the API is not served in plaintext on that port…
    let err = call(probe.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
    // …nor on the API port.
    let err = health_status(&plaintext_channel(app.addr), "readiness").await.unwrap_err();
    assert!(refused_by_transport(&err), "{err}");
    app.stop().await.unwrap();
}

/// Replaces `dst`'s certificate and key by `src`'s, each by a rename.
fn install(src: &(std::path::PathBuf, std::path::PathBuf), dst_dir: &Path) {
    for (from, name) in [(&src.0, "server.pem"), (&src.1, "server-key.pem")] {
        let tmp = dst_dir.join(format!("{name}.tmp"));
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, dst_dir.join(name)).unwrap();
    }
}

#[tokio::test]
async fn a_rotated_certificate_applies_to_new_connections_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path().join("a"));
    let next = TestPki::new(dir.path().join("b"));
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    install(&pki.issue("ratelimit", SERVER_ID), &live);
    let server = TlsConfig {
        reload_interval: Duration::from_millis(100),
        ..TlsConfig::new(live.join("server.pem"), live.join("server-key.pem"), pki.ca_path())
    };
    let app = spawn_tls(server, free_addr()).await;

    // Trusts only the first CA; its connection opens before the rotation.
    let old_caller = pki.tls_config("data", CALLER_ID);
    let open = channel(&old_caller, app.addr);
    eventually(WAIT, "the first certificate is served", || {
        let ch = open.clone();
        async move { call(ch).await.ok() }
    })
    .await;

    // The server now presents a certificate from the second CA.
    install(&next.issue("ratelimit", SERVER_ID), &live);
    let new_caller = TlsConfig { ca_file: next.ca_path(), ..pki.tls_config("session", CALLER_ID) };
    eventually(WAIT, "a new connection sees the new certificate", || {
        let (old, new) = (channel(&old_caller, app.addr), channel(&new_caller, app.addr));
        async move { (call(old).await.is_err() && call(new).await.is_ok()).then_some(()) }
    })
    .await;
    // The connection opened before the rotation keeps working.
    assert_eq!(call(open).await.unwrap(), Code::Ok);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_mesh_client_calls_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let app = spawn_tls(pki.tls_config("ratelimit", SERVER_ID), free_addr()).await;

    let mut env: HashMap<String, String> = pki.env("data", CALLER_ID).into_iter().collect();
    env.insert("MESH_RATELIMIT_ADDR".into(), format!("127.0.0.1:{}", app.addr.port()));
    let config = mesh_client::ClientConfig::from_lookup(&env).unwrap();
    assert!(config.stack.tls.is_some());
    let client =
        mesh_client::RateLimitClient::from_config(&config, &mesh_client::ClientMetrics::default()).unwrap();
    let resp = eventually(WAIT, "the mesh client is answered over tls", || {
        let client = client.clone();
        let req = CheckRequest {
            domain: "tls-test".into(),
            descriptors: vec![desc(&[("k", "v")], None)],
            hits_addend: 0,
        };
        async move { client.check(req).await.ok() }
    })
    .await;
    assert_eq!(resp.overall_code(), Code::Ok);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn require_tls_without_a_certificate_exits_64() {
    let env = [
        ("MESH_REQUIRE_TLS".to_owned(), "true".to_owned()),
        ("MESH_LISTEN_ADDR".to_owned(), free_addr().to_string()),
        ("MESH_METRICS_ADDR".to_owned(), free_addr().to_string()),
    ];
    let mut p = Process::start(env!("CARGO_BIN_EXE_mesh-ratelimit"), &env).unwrap();
    let status = p.wait(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(64), "{status}");

    // A key without its certificate is refused the same way.
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let (_, key) = pki.issue("ratelimit", SERVER_ID);
    let mut env = env.to_vec();
    env.push(("MESH_TLS_KEY_FILE".to_owned(), key.to_string_lossy().into_owned()));
    let mut p = Process::start(env!("CARGO_BIN_EXE_mesh-ratelimit"), &env).unwrap();
    let status = p.wait(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(64), "{status}");
}
