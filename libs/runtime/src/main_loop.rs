//! The body of every service's `main`: telemetry first (so configuration
//! errors are logged like everything else), then configuration, build, serve
//! until SIGTERM or Ctrl-C, drain, flush spans, and the exit code.

use std::{fmt::Display, process::ExitCode};

use crate::{EXIT_CONFIG, Env, Roots, Telemetry, TelemetryConfig, server::shutdown_signal};

/// Why a service could not start: a bad setting (exit [`EXIT_CONFIG`]) or
/// anything else (a dependency that never answered: exit 1).
pub trait StartFailure: Display {
    /// True when the configuration is at fault, not the machine.
    fn is_config(&self) -> bool {
        false
    }
}

/// Runs service `name`: `config` reads the environment, `build` turns it into
/// an app, `serve` serves it until the shutdown future it is given resolves.
/// Exit codes: 0 after a clean drain, [`EXIT_CONFIG`] (64) for a bad
/// configuration, 1 for anything else.
pub async fn run_service<C, A, CE, BE, SE, B, S>(
    name: &'static str,
    config: impl FnOnce() -> Result<C, CE>,
    build: impl FnOnce(C) -> B,
    serve: impl FnOnce(A, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> S,
) -> ExitCode
where
    CE: Display,
    BE: StartFailure,
    SE: Display,
    B: Future<Output = Result<A, BE>>,
    S: Future<Output = Result<(), SE>>,
{
    let telemetry = match TelemetryConfig::from_lookup(&Env, name) {
        Ok(c) => Telemetry::init(&TelemetryConfig { roots: Roots::ServedCalls, ..c }),
        Err(e) => {
            eprintln!("bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match config() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "bad configuration");
            telemetry.shutdown().await;
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let app = match build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            telemetry.shutdown().await;
            return if e.is_config() { ExitCode::from(EXIT_CONFIG) } else { ExitCode::FAILURE };
        }
    };
    let result = serve(app, Box::pin(shutdown_signal())).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server failed: {e}");
            ExitCode::FAILURE
        }
    }
}
