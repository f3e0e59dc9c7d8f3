//! Running servers under test: in-process (graceful stop) or as a real
//! binary (SIGTERM, SIGKILL, exit codes).

use std::{net::SocketAddr, pin::Pin, process::ExitStatus, time::Duration};

use anyhow::Context as _;
use nix::{sys::signal, unistd::Pid};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::LogBuffer;

/// The shutdown future handed to a spawned server.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A server running in this process.
#[derive(Debug)]
pub struct Running {
    /// gRPC address.
    pub addr: SocketAddr,
    /// Metrics address.
    pub metrics_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Runs `serve(shutdown)` in a task: pass `|sd| app.serve(sd)`.
pub fn spawn<F, Fut, E>(addr: SocketAddr, metrics_addr: SocketAddr, serve: F) -> Running
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (tx, rx) = oneshot::channel::<()>();
    let fut = serve(Box::pin(async move {
        let _ = rx.await;
    }));
    let task = tokio::spawn(async move { fut.await.map_err(|e| anyhow::anyhow!("{e}")) });
    Running { addr, metrics_addr, stop: Some(tx), task }
}

impl Running {
    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down gracefully and returns the server's result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.begin_stop();
        self.task.await.context("server task panicked")?.context("the server's graceful stop failed")
    }

    /// Waits for the server to finish (after [`Running::begin_stop`]).
    pub async fn join(self) -> anyhow::Result<()> {
        self.task.await.context("server task panicked")?
    }
}

/// A service binary running as a child process.
#[derive(Debug)]
pub struct Process {
    child: tokio::process::Child,
}

impl Process {
    /// Starts `binary` (e.g. `env!("CARGO_BIN_EXE_mesh-ratelimit")`) with `env`
    /// on top of a clean environment (PATH and HOME kept). Output goes to the
    /// test's output when `TEST_LOG` is set, else nowhere.
    pub fn start(binary: &str, env: &[(String, String)]) -> anyhow::Result<Self> {
        let mut cmd = Self::command(binary, env);
        if std::env::var_os("TEST_LOG").is_none() {
            cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        }
        Ok(Self { child: cmd.spawn().with_context(|| format!("starting {binary}"))? })
    }

    /// Like [`Process::start`], with everything the process writes to
    /// stdout and stderr appended to `output` instead.
    pub fn start_captured(
        binary: &str,
        env: &[(String, String)],
        output: &LogBuffer,
    ) -> anyhow::Result<Self> {
        let mut cmd = Self::command(binary, env);
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {binary}"))?;
        let copy = |mut from: Box<dyn tokio::io::AsyncRead + Send + Unpin>| {
            let mut to = output.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                while let Ok(n @ 1..) = tokio::io::AsyncReadExt::read(&mut from, &mut buf).await {
                    let _ = std::io::Write::write_all(&mut to, &buf[..n]);
                }
            });
        };
        copy(Box::new(child.stdout.take().expect("piped stdout")));
        copy(Box::new(child.stderr.take().expect("piped stderr")));
        Ok(Self { child })
    }

    fn command(binary: &str, env: &[(String, String)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(binary);
        cmd.env_clear();
        for key in ["PATH", "HOME", "RUST_LOG", "RUST_BACKTRACE"] {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        cmd
    }

    fn signal(&self, sig: signal::Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already reaped")?;
        signal::kill(Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }

    /// The process id (`None` once it has been reaped).
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal(signal::Signal::SIGTERM)
    }

    /// Sends SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&self) -> anyhow::Result<()> {
        self.signal(signal::Signal::SIGKILL)
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("process did not exit in time")?
            .context("waiting for process")
    }
}

/// A free loopback port for a child process to bind.
///
/// Picked below Linux's ephemeral range (and clear of the ranges
/// [`crate::PrivateInfra`] uses), so no outgoing connection of another test
/// can take it between this check and the child's bind.
pub fn free_addr() -> SocketAddr {
    use rand::Rng as _;
    let mut rng = rand::rng();
    loop {
        let port: u16 = rng.random_range(16_100..19_900);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().expect("bound address");
        }
    }
}

/// Resident set size of a process in KiB (`VmRSS` in Linux's
/// `/proc/<pid>/status`); `None` when the process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
