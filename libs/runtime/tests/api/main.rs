//! Integration tests of the server runtime, with the testkit's echo service
//! over real sockets.

mod health_spec;
mod helpers;
mod observe;
mod readiness;
mod reflection;
mod shutdown;
mod spans;
