//! Reflection is complete on a served echo server: the conformance checks
//! every service runs (grpcurl v1alpha, Python grpcio v1 and v1alpha) pass.

use std::time::Duration;

use mesh_runtime::ServerConfig;
use mesh_testkit::conformance;

use crate::helpers::{ECHO, spawn_echo};

#[tokio::test]
async fn every_listed_symbol_and_error_detail_type_resolves() {
    let app = spawn_echo(ServerConfig::for_tests(), vec![]).await;
    conformance::assert_serving(app.addr, &[ECHO], Duration::from_secs(5)).await.unwrap();
    conformance::assert_reflection(app.addr, &[ECHO]).await.unwrap();
    app.stop().await.unwrap();
}
