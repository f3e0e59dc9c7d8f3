//! `mesh-audit`: the audit service, and its offline tools
//! (`mesh-audit verify | export | retention`, see `mesh-audit --help`).

use std::process::ExitCode;

use clap::Parser as _;
use mesh_audit::{App, Config, cli::Cli};
use mesh_runtime::{EXIT_CONFIG, Telemetry, TelemetryConfig, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(command) = Cli::parse().command {
        return mesh_audit::cli::run(command).await;
    }

    // Telemetry first, so configuration errors are logged like everything else.
    let telemetry = match TelemetryConfig::from_lookup(&mesh_runtime::Env, "mesh-audit") {
        Ok(c) => Telemetry::init(&c),
        Err(e) => {
            eprintln!("bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };

    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "bad configuration");
            telemetry.shutdown().await;
            return ExitCode::from(EXIT_CONFIG);
        }
    };

    let app = match App::build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            telemetry.shutdown().await;
            return ExitCode::FAILURE;
        }
    };

    // Serve until SIGTERM, then drain within the grace period.
    let result = app.serve(shutdown_signal()).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server failed: {e}");
            ExitCode::FAILURE
        }
    }
}
