//! Integration tests of the data service: the real PostgreSQL primary and
//! replica, the real session, rate-limit and audit services, real gRPC.

mod audit;
mod auth;
mod bad_input;
mod cancel;
mod command_line;
mod crud;
mod helpers;
mod lifecycle;
mod metrics;
mod pg_roles;
mod processes;
mod query;
mod roles;
mod routing;
mod secrets;
mod tls;
mod trace;
mod values;
