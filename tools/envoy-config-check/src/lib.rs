//! Loads an Envoy configuration file (YAML) into Envoy's own bootstrap proto,
//! `envoy.config.bootstrap.v3.Bootstrap`, the way Envoy does at start: YAML to
//! JSON, then the proto3 JSON mapping with unknown fields refused and every
//! `@type` of an `Any` resolved against the compiled protos. No Envoy binary is
//! needed: the protos are the ones vendored in `deploy/envoy/proto`
//! (data-plane-api, cncf/xds, protoc-gen-validate), compiled at run time with
//! protox.
//!
//! What this does not do: Envoy's protoc-gen-validate rules (`min_len`,
//! `gt`, required oneofs) and its checks across resources (a route naming a
//! cluster that does not exist). The tests in `tests/envoy_config.rs` assert
//! the wiring mesh depends on themselves.
//!
//! # Layout
//! Two functions: [`compile_protos`] builds the descriptor pool,
//! [`load_bootstrap`] parses one file with it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};

/// The full name of Envoy's bootstrap message.
pub const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";

/// The proto files whose messages the configurations use, relative to
/// [`proto_root`]: the bootstrap, plus every message a `typed_config` or a
/// `typed_extension_protocol_options` entry names by `@type` (an `Any` is only
/// resolvable when its type is in the pool). Their imports come along.
pub const ROOT_PROTOS: &[&str] = &[
    "envoy/config/bootstrap/v3/bootstrap.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/ext_authz/v3/ext_authz.proto",
    "envoy/extensions/filters/http/ratelimit/v3/rate_limit.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/extensions/access_loggers/stream/v3/stream.proto",
];

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `deploy/envoy/proto`, where the vendored protos live.
pub fn proto_root() -> PathBuf {
    repo_root().join("deploy/envoy/proto")
}

/// Compiles [`ROOT_PROTOS`] (and their imports) under [`proto_root`].
///
/// # Errors
/// A file is missing or does not compile (the error names it).
pub fn compile_protos() -> Result<DescriptorPool> {
    let root = proto_root();
    let mut compiler = protox::Compiler::new([&root]).context("protox include path")?;
    compiler.include_imports(true);
    compiler.open_files(ROOT_PROTOS).map_err(|e| anyhow::anyhow!("compiling {}: {e}", root.display()))?;
    Ok(compiler.descriptor_pool())
}

/// Parses `yaml` into a `Bootstrap` as Envoy does: YAML to JSON, then the
/// proto3 JSON mapping, refusing unknown fields, values of the wrong type,
/// and `Any` values whose `@type` is not in `pool`.
///
/// Returns the message and its canonical JSON (proto field names, defaults
/// left out), which the wiring checks read.
///
/// # Errors
/// The YAML does not parse, or does not fit the bootstrap proto (the error
/// says where).
pub fn load_bootstrap(pool: &DescriptorPool, yaml: &str) -> Result<(DynamicMessage, serde_json::Value)> {
    let desc = pool.get_message_by_name(BOOTSTRAP).context("bootstrap message not in the pool")?;
    let json: serde_json::Value = serde_yaml_ng::from_str(yaml).context("yaml")?;
    let msg = DynamicMessage::deserialize_with_options(
        desc,
        json,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .context("envoy.config.bootstrap.v3.Bootstrap")?;
    let canonical = msg
        .serialize_with_options(
            serde_json::value::Serializer,
            &SerializeOptions::new().use_proto_field_name(true).skip_default_fields(true),
        )
        .context("re-serialising the bootstrap")?;
    Ok((msg, canonical))
}
