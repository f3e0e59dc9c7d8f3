//! The command line and the listeners it implies: `--help` lists every
//! variable the process reads, arguments it does not take are refused,
//! docs/CONFIGURATION.md matches, and the metrics port follows the gRPC port.

use std::{net::SocketAddr, time::Duration};

use mesh_ratelimit::Config;
use mesh_testkit::{Infra, Process, conformance, help};

use crate::helpers::SERVED;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-ratelimit");

#[test]
fn help_lists_every_variable_the_process_reads() {
    let sources = ["services/ratelimit/src", "libs/runtime/src"];
    help::assert_help_lists_every_variable(BIN, &Config::help(), &sources, &[]).unwrap();
}

#[test]
fn unknown_arguments_are_refused() {
    help::assert_unknown_argument_refused(BIN).unwrap();
}

#[test]
fn configuration_docs_match_help() {
    help::assert_documented(BIN, "mesh-ratelimit", &["--help"]).unwrap();
}

/// A free loopback gRPC address whose port + 1000 is free too, distinct
/// from (and not 1000 apart from) `taken`.
fn free_pair(taken: &[SocketAddr]) -> SocketAddr {
    loop {
        let grpc = mesh_testkit::free_addr();
        let metrics = SocketAddr::new(grpc.ip(), grpc.port() + 1000);
        let clash = taken.iter().any(|t| t.port().abs_diff(grpc.port()) % 1000 == 0);
        if !clash && std::net::TcpListener::bind(metrics).is_ok() {
            return grpc;
        }
    }
}

/// Two instances on different gRPC ports and no `MESH_METRICS_ADDR` both
/// start and serve `/metrics` on their own gRPC port + 1000 (the default
/// used to be one fixed port per service, so the second failed to bind).
#[tokio::test]
async fn metrics_port_follows_the_grpc_port_so_a_second_instance_starts() {
    let mut env = Infra::shared().env("unused", &mesh_testkit::redis_prefix());
    env.push(("MESH_HEALTH_INTERVAL_MS".to_owned(), "200".to_owned()));
    let first = free_pair(&[]);
    let second = free_pair(&[first]);
    let mut processes = Vec::new();
    for addr in [first, second] {
        let mut env = env.clone();
        env.push(("MESH_LISTEN_ADDR".to_owned(), addr.to_string()));
        processes.push(Process::start(BIN, &env).unwrap());
    }
    for addr in [first, second] {
        conformance::assert_serving(addr, SERVED, Duration::from_secs(20)).await.unwrap();
        let metrics = SocketAddr::new(addr.ip(), addr.port() + 1000);
        let text = mesh_testkit::scrape_metrics(metrics).await.unwrap();
        assert!(text.contains("mesh_ready"), "no mesh_ready on {metrics}:\n{text}");
    }
    for p in &processes {
        p.terminate().unwrap();
    }
    for p in &mut processes {
        let status = p.wait(Duration::from_secs(15)).await.unwrap();
        assert!(status.success(), "exited with {status}");
    }
}
