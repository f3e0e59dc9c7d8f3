//! Integration tests of the rate-limit service against the real Redis Cluster.

mod authz;
mod bad_input;
mod command_line;
mod envoy;
mod failover;
mod helpers;
mod lifecycle;
mod limits;
mod metrics;
mod overload;
mod paths;
mod reshard;
mod rules;
mod saga;
mod tls;
