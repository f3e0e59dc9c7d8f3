//! Integration tests of the session service against the real Redis Cluster
//! and the real rate-limit and audit services.

mod audit;
mod durability;
mod failover;
mod helpers;
mod instances;
mod lifecycle;
mod ratelimit;
mod reshard;
mod sessions;
