//! Generated code for mesh's public gRPC API (`proto/mesh/<svc>/v1`) and the
//! vendored Envoy rate-limit protos, built from `proto/` by `build.rs` with
//! protox, so no system `protoc` is needed.
//!
//! [`FILE_DESCRIPTOR_SET`] holds every compiled file (and the well-known types
//! they import) for gRPC server reflection. [`json`] converts
//! `google.protobuf.Struct` to and from JSON without losing a bit.

#![allow(unreachable_pub, missing_debug_implementations, clippy::all)]

pub mod json;

/// Encoded `google.protobuf.FileDescriptorSet` of everything under `proto/`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mesh_descriptor.bin"));

/// `mesh.*` packages.
pub mod mesh {
    /// `mesh.session.v1`.
    pub mod session {
        pub mod v1 {
            tonic::include_proto!("mesh.session.v1");
            /// Fully-qualified service name, as used by health and reflection.
            pub const SERVICE_NAME: &str = "mesh.session.v1.SessionService";
        }
    }
    /// `mesh.ratelimit.v1`.
    pub mod ratelimit {
        pub mod v1 {
            tonic::include_proto!("mesh.ratelimit.v1");
            /// Fully-qualified service name, as used by health and reflection.
            pub const SERVICE_NAME: &str = "mesh.ratelimit.v1.RateLimitService";
        }
    }
    /// `mesh.audit.v1`.
    pub mod audit {
        pub mod v1 {
            tonic::include_proto!("mesh.audit.v1");
            /// Fully-qualified service name, as used by health and reflection.
            pub const SERVICE_NAME: &str = "mesh.audit.v1.AuditService";
        }
    }
    /// `mesh.data.v1`.
    pub mod data {
        pub mod v1 {
            tonic::include_proto!("mesh.data.v1");
            /// Fully-qualified service name, as used by health and reflection.
            pub const SERVICE_NAME: &str = "mesh.data.v1.DataService";
        }
    }
}

/// `envoy.*` packages: the vendored Envoy rate-limit service (RLS v3) API,
/// wire-compatible with Envoy (see `proto/envoy/README.md`).
pub mod envoy {
    /// `envoy.config.*`.
    pub mod config {
        /// `envoy.config.core`.
        pub mod core {
            /// `envoy.config.core.v3`.
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// `envoy.extensions.*`.
    pub mod extensions {
        /// `envoy.extensions.common`.
        pub mod common {
            /// `envoy.extensions.common.ratelimit`.
            pub mod ratelimit {
                /// `envoy.extensions.common.ratelimit.v3`.
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    /// `envoy.r#type.*`.
    pub mod r#type {
        /// `envoy.type.v3`.
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
    /// `envoy.service.*`.
    pub mod service {
        /// `envoy.service.auth`.
        pub mod auth {
            /// `envoy.service.auth.v3`.
            pub mod v3 {
                tonic::include_proto!("envoy.service.auth.v3");
                /// Fully-qualified service name, as used by health and reflection.
                pub const SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";
            }
        }
        /// `envoy.service.ratelimit`.
        pub mod ratelimit {
            /// `envoy.service.ratelimit.v3`.
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");
                /// Fully-qualified service name, as used by health and reflection.
                pub const SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";
            }
        }
    }
}

/// Envoy's rate-limit service API (`envoy.service.ratelimit.v3`).
pub use envoy::service::ratelimit::v3 as envoy_rls;

/// Envoy's external authorization API (`envoy.service.auth.v3`).
pub use envoy::service::auth::v3 as envoy_authz;

pub use mesh::{audit::v1 as audit, data::v1 as data, ratelimit::v1 as ratelimit, session::v1 as session};

#[cfg(test)]
mod tests {
    use prost::Message;

    /// Every mesh service named in the API contract is in the descriptor set
    /// that reflection serves.
    #[test]
    fn descriptor_set_holds_every_service() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<String> = fds
            .file
            .iter()
            .flat_map(|f| {
                let pkg = f.package().to_owned();
                f.service.iter().map(move |s| format!("{pkg}.{}", s.name()))
            })
            .collect();
        for name in [
            super::session::SERVICE_NAME,
            super::ratelimit::SERVICE_NAME,
            super::audit::SERVICE_NAME,
            super::data::SERVICE_NAME,
            super::envoy_rls::SERVICE_NAME,
            super::envoy_authz::SERVICE_NAME,
        ] {
            assert!(services.iter().any(|s| s == name), "{name} missing from {services:?}");
        }
    }
}
