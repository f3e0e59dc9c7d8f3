//! Reset is an admin RPC: only for `MESH_ADMIN_IDENTITIES` over mutual TLS;
//! anyone else gets PERMISSION_DENIED, counted. (That a refusal reaches the
//! real audit log is tested in the session crate, which runs all three.)

use mesh_proto::ratelimit::{ResetRequest, rate_limit_service_client::RateLimitServiceClient};
use mesh_runtime::authz::AdminIdentities;
use mesh_testkit::{Infra, tls::TestPki};
use tonic::Code;

use crate::helpers::{RulesFile, client, config_with, desc, hit, metric, spawn_app};

const OPS: &str = "spiffe://mesh.local/ns/default/sa/ops";
const DATA: &str = "spiffe://mesh.local/ns/default/sa/data";
const RESET: &str = "/mesh.ratelimit.v1.RateLimitService/Reset";

const RULES: &str =
    "domain: admin\ndescriptors:\n  - key: user\n    rate_limit: { unit: hour, requests_per_unit: 1 }\n";

fn admins(ids: &[&str]) -> AdminIdentities {
    AdminIdentities(Some(ids.iter().map(|s| (*s).to_owned()).collect()))
}

fn reset() -> ResetRequest {
    ResetRequest { domain: "admin".into(), descriptor: Some(desc(&[("user", "u1")], None)) }
}

#[tokio::test]
async fn only_listed_identities_may_reset_over_tls() {
    let _t = mesh_testkit::init_telemetry();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let rules = RulesFile::new(RULES);
    let mut config = config_with(Infra::shared(), &rules);
    config.server.tls = Some(pki.tls_config("ratelimit", "spiffe://mesh.local/ns/default/sa/ratelimit"));
    config.server.admin_identities = admins(&[OPS]);
    let app = spawn_app(config).await;
    let mut ops = RateLimitServiceClient::new(pki.channel("ops", OPS, app.addr).await);
    let mut data = RateLimitServiceClient::new(pki.channel("data", DATA, app.addr).await);

    // The one hit of the hour is spent.
    assert!(hit(&mut data, "admin", &[("user", "u1")]).await.ok());
    assert!(!hit(&mut data, "admin", &[("user", "u1")]).await.ok());

    // A non-admin cannot give it back, and is told why.
    let e = data.reset(reset()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(RESET) && e.message().contains(DATA), "{e:?}");
    assert!(!hit(&mut data, "admin", &[("user", "u1")]).await.ok(), "the refused reset changed nothing");
    assert_eq!(metric(&app, "mesh_authz_denied_total", &["grpc_method=\"Reset\""]).await, 1.0);

    // The admin can.
    ops.reset(reset()).await.expect("admin resets");
    assert!(hit(&mut data, "admin", &[("user", "u1")]).await.ok());
    assert_eq!(metric(&app, "mesh_authz_denied_total", &["grpc_method=\"Reset\""]).await, 1.0);
}

#[tokio::test]
async fn without_tls_reset_is_open_only_while_no_admins_are_configured() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let open = spawn_app(config_with(Infra::shared(), &rules)).await;
    client(&open).await.reset(reset()).await.expect("local development: anyone may reset");

    let mut config = config_with(Infra::shared(), &rules);
    config.server.admin_identities = admins(&[OPS]);
    let closed = spawn_app(config).await;
    let e = client(&closed).await.reset(reset()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("without TLS"), "{e:?}");
    assert_eq!(metric(&closed, "mesh_authz_denied_total", &["grpc_method=\"Reset\""]).await, 1.0);
}
