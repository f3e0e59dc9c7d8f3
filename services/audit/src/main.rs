//! `mesh-audit`: the audit service, and its offline tools
//! (`mesh-audit verify | export | retention | keygen | migrate`, see `mesh-audit --help`).

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};
use mesh_audit::{App, Config, cli::Cli};

#[tokio::main]
async fn main() -> ExitCode {
    // `--help` lists, after the commands, every variable the service reads.
    let matches = Cli::command().after_help(Config::help().render_vars()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(command) = cli.command {
        return mesh_audit::cli::run(command).await;
    }
    mesh_runtime::run_service("mesh-audit", Config::from_env, App::build, |app, shutdown| app.serve(shutdown))
        .await
}
