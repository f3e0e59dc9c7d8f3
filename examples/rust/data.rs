//! Put then Get with a session token against MESH_DATA_ADDR (default 127.0.0.1:50054), through session, rate-limit and audit.
//!
//! `cargo run -p mesh-examples --example data [USER]` (USER defaults to `alice`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = mesh_examples::config_from_env()?;
    mesh_examples::data(&config, &mesh_examples::user_from_args(), &mut std::io::stdout()).await
}
