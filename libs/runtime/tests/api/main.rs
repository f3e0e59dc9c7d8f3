//! Integration tests of the server runtime, with the testkit's echo service
//! over real sockets.

mod admission;
mod health_spec;
mod helpers;
mod observe;
mod readiness;
mod redis_tls;
mod reflection;
mod shutdown;
mod spans;
