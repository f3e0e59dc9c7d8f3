//! Integration tests of the session service against the real Redis Cluster.

mod helpers;
mod lifecycle;
