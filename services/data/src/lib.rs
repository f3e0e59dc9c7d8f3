//! The mesh data service (`mesh.data.v1.DataService`).
//!
//! # Layout
//! - `config`: [`Config`] from the environment.
//! - `app`: [`App`]: connects to PostgreSQL, migrates, serves.
//! - `api`: the gRPC service.

mod api;
mod app;
mod config;

pub use app::{App, StartError};
pub use config::{Config, DEFAULT_PORT};
