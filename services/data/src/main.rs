//! `mesh-data`: the data service; `mesh-data migrate` runs its migrations and exits.

use std::process::ExitCode;

use mesh_data::{App, Config};

#[tokio::main]
async fn main() -> ExitCode {
    // `mesh-data migrate`: the schema owner's step (MESH_DATABASE_MIGRATE=verify servers run no DDL).
    if std::env::args_os().nth(1).is_some_and(|a| a == "migrate") && std::env::args_os().len() == 2 {
        return App::migrate_command().await;
    }
    if let Some(code) = mesh_runtime::config::handle_args(Config::help) {
        return code;
    }
    mesh_runtime::run_service("mesh-data", Config::from_env, App::build, |app, shutdown| app.serve(shutdown))
        .await
}
