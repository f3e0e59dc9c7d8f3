//! Integration tests of the data service: the real PostgreSQL primary and
//! replica, the real session, rate-limit and audit services, real gRPC.

mod audit;
mod auth;
mod cancel;
mod crud;
mod helpers;
mod lifecycle;
mod query;
mod routing;
mod trace;
mod values;
