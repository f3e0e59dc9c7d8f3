//! Integration tests of the rate-limit service against the real Redis Cluster.

mod helpers;
mod lifecycle;
