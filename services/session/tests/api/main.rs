//! Integration tests of the session service against the real Redis Cluster
//! and the real rate-limit and audit services.

mod audit;
mod authz;
mod bad_input;
mod command_line;
mod declared_keys;
mod durability;
mod ext_authz;
mod failover;
mod helpers;
mod instances;
mod lifecycle;
mod ratelimit;
mod reshard;
mod sessions;
