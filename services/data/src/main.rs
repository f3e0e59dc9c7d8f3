//! `mesh-data`: the data service.

use std::process::ExitCode;

use mesh_data::{App, Config};

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(code) = mesh_runtime::config::handle_args(Config::help) {
        return code;
    }
    mesh_runtime::run_service("mesh-data", Config::from_env, App::build, |app, shutdown| app.serve(shutdown))
        .await
}
