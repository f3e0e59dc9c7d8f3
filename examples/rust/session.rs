//! CreateSession → ValidateSession → RevokeSession against MESH_SESSION_ADDR (default 127.0.0.1:50051).
//!
//! `cargo run -p mesh-examples --example session [USER]` (USER defaults to `alice`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = mesh_examples::config_from_env()?;
    mesh_examples::session(&config, &mesh_examples::user_from_args(), &mut std::io::stdout()).await
}
