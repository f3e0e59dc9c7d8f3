//! `mesh-ratelimit`: the rate-limit service.

use std::process::ExitCode;

use mesh_ratelimit::{App, Config};

#[tokio::main]
async fn main() -> ExitCode {
    mesh_runtime::run_service("mesh-ratelimit", Config::from_env, App::build, |app, shutdown| {
        app.serve(shutdown)
    })
    .await
}
