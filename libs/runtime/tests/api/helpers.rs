use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use mesh_runtime::{Check, Server, ServerConfig};
use mesh_testkit::{Running, echo, spawn};

/// A dependency the test switches up and down.
#[derive(Debug, Clone, Default)]
pub(crate) struct Switch(Arc<AtomicBool>);

impl Switch {
    pub(crate) fn up() -> Self {
        let s = Self::default();
        s.set(true);
        s
    }

    pub(crate) fn set(&self, up: bool) {
        self.0.store(up, Ordering::SeqCst);
    }

    pub(crate) fn check(&self) -> Check {
        let s = self.0.clone();
        Check::new("switch", move || {
            let up = s.load(Ordering::SeqCst);
            async move { if up { Ok(()) } else { Err("switched off".to_owned()) } }
        })
    }
}

/// An echo server on the runtime, with `checks` gating readiness.
pub(crate) async fn spawn_echo(config: ServerConfig, checks: Vec<Check>) -> Running {
    let mut server = Server::bind(config).await.unwrap();
    server.add_service(echo::server()).add_descriptor_set(echo::FILE_DESCRIPTOR_SET);
    for c in checks {
        server.add_check(c);
    }
    spawn(server.local_addr(), server.metrics_addr(), |sd| server.serve(sd))
}

pub(crate) const ECHO: &str = "mesh.testkit.echo.v1.EchoService";
