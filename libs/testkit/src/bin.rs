//! The mesh's service binaries, for tests that run several services as
//! real processes (one OpenTelemetry resource each, `kill -9`, exit codes).

use std::path::PathBuf;

use anyhow::{Context as _, bail};

/// The path of service binary `name` (e.g. `mesh-session`) of the profile
/// the running test was built with, next to the test's own binaries.
///
/// `cargo nextest run --workspace` builds every binary first; a test run
/// with `-p` may not have, so a missing binary is built here (`cargo build
/// --bin name`, quick when it is up to date).
pub fn service_binary(name: &str) -> anyhow::Result<PathBuf> {
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|d| d.parent()).context("test binary has no target directory")?;
    let path = dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(crate::repo_root()).args(["build", "--locked", "--bin", name]);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
        None => bail!("cannot tell the build profile of {}", dir.display()),
    }
    let status = cmd.status().with_context(|| format!("building {name}"))?;
    if !status.success() || !path.exists() {
        bail!("cargo build --bin {name} failed ({status})");
    }
    Ok(path)
}
