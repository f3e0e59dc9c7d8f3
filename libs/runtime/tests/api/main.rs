//! Integration tests of the server runtime, with the testkit's echo service
//! over real sockets.

mod helpers;
mod observe;
mod readiness;
mod shutdown;
