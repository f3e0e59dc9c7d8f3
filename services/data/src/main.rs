//! `mesh-data`: the data service.

use std::process::ExitCode;

use mesh_data::{App, Config};

#[tokio::main]
async fn main() -> ExitCode {
    mesh_runtime::run_service("mesh-data", Config::from_env, App::build, |app, shutdown| app.serve(shutdown))
        .await
}
