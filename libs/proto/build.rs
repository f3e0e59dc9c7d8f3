//! Compiles every `.proto` under the workspace's `proto/` with protox (pure
//! Rust, so no system `protoc`) and generates prost messages + tonic stubs,
//! plus one encoded file descriptor set for server reflection.

use std::{
    env,
    path::{Path, PathBuf},
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let root = root.canonicalize()?;
    let mut files = Vec::new();
    collect(&root, &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed={}", root.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // `status.proto` (google.rpc.Status) is tonic-types' file, and reflection
    // serves tonic-types' set: one file per symbol, or clients that build a
    // descriptor pool refuse the duplicate.
    let mut reflected = fds.clone();
    reflected.file.retain(|f| f.name() != "status.proto");
    std::fs::write(out.join("mesh_descriptor.bin"), prost::Message::encode_to_vec(&reflected))?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // google.rpc.Status (Envoy's ext_authz CheckResponse): tonic-types' own.
        .extern_path(".google.rpc", "::tonic_types::pb")
        .compile_fds(fds)?;
    Ok(())
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
