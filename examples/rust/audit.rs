//! Append with an idempotency key, Query, Verify against MESH_AUDIT_ADDR (default 127.0.0.1:50053).
//!
//! `cargo run -p mesh-examples --example audit [USER]` (USER defaults to `alice`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = mesh_examples::config_from_env()?;
    mesh_examples::audit(&config, &mesh_examples::user_from_args(), &mut std::io::stdout()).await
}
