//! `mesh-audit`: the audit service, and its offline tools
//! (`mesh-audit verify | export | retention`, see `mesh-audit --help`).

use std::process::ExitCode;

use clap::Parser as _;
use mesh_audit::{App, Config, cli::Cli};

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(command) = Cli::parse().command {
        return mesh_audit::cli::run(command).await;
    }
    mesh_runtime::run_service("mesh-audit", Config::from_env, App::build, |app, shutdown| app.serve(shutdown))
        .await
}
