use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use mesh_runtime::{Check, Need, Server, ServerConfig};
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

    /// Its check, named `name`.
    pub(crate) fn check(&self, name: &str) -> Check {
        let s = self.0.clone();
        Check::new(name, move || {
            let up = s.load(Ordering::SeqCst);
            async move { if up { Ok(()) } else { Err("switched off".to_owned()) } }
        })
    }
}

/// An echo server on the runtime with the dependencies `deps`.
pub(crate) async fn spawn_echo(config: ServerConfig, deps: Vec<(Check, Need)>) -> Running {
    let mut server = Server::bind(config).await.unwrap();
    server.add_service(echo::server()).add_descriptor_set(echo::FILE_DESCRIPTOR_SET);
    for (check, need) in deps {
        server.add_dependency(check, need);
    }
    spawn(server.local_addr(), server.metrics_addr(), |sd| server.serve(sd))
}

pub(crate) const ECHO: &str = "mesh.testkit.echo.v1.EchoService";
