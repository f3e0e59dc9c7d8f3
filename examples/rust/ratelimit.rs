//! One Check with two descriptors in domain `api` against MESH_RATELIMIT_ADDR (default 127.0.0.1:50052).
//!
//! `cargo run -p mesh-examples --example ratelimit [USER]` (USER defaults to `alice`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = mesh_examples::config_from_env()?;
    mesh_examples::ratelimit(&config, &mesh_examples::user_from_args(), &mut std::io::stdout()).await
}
