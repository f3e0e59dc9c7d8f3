//! A TCP proxy that holds every byte back for a fixed time in each
//! direction: a datastore on a slow network, for tests whose subject is
//! what a service does when a dependency is slow but answers.
//!
//! Each chunk read from one side is written to the other `delay` after it
//! was read, in order; chunks are not serialised behind each other's delay,
//! so a pipelined connection keeps its throughput and gains `2 × delay` per
//! round trip. EOF is passed on after the bytes before it.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::OwnedReadHalf, tcp::OwnedWriteHalf},
    sync::mpsc,
    task::{JoinHandle, JoinSet},
    time::Instant,
};

/// A running proxy on `127.0.0.1:0`; dropping it closes the listener and
/// every connection through it.
#[derive(Debug)]
pub struct LatencyProxy {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl LatencyProxy {
    /// Starts a proxy to `upstream` that adds `delay` each way.
    pub async fn start(upstream: SocketAddr, delay: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            // Owned here, so aborting the accept loop ends every connection.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, delay), pipe(sr, cw, delay));
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, task })
    }

    /// Where to connect instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read; `None` is EOF.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    // Bounded: a reader far ahead of its writer waits (TCP's own backpressure).
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(1024);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let chunk = match from.read(&mut buf).await {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            };
            let end = chunk.is_none();
            if tx.send((Instant::now() + delay, chunk)).await.is_err() || end {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            match chunk {
                Some(bytes) if to.write_all(&bytes).await.is_ok() => {}
                _ => break,
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_arrive_in_order_each_way_after_the_delay() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let proxy = LatencyProxy::start(upstream, Duration::from_millis(50)).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let start = Instant::now();
        c.write_all(b"one").await.unwrap();
        c.write_all(b"two").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 6 {
            let mut buf = [0u8; 16];
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"onetwo");
        // Out and back: at least twice the delay, and not once per chunk more.
        let rtt = start.elapsed();
        assert!(rtt >= Duration::from_millis(100), "{rtt:?}");
        assert!(rtt < Duration::from_millis(1000), "{rtt:?}");
    }
}
