//! A coordinator or a participant served on the caller's tokio runtime, on a loopback port.
//!
//! In process, because that is cheapest and a panic in it shows in the test's own output; a
//! [`Server`] is stopped the way a crash would stop it ([`Server::kill`]: its task dropped, its
//! connections cut) or gracefully ([`Server::shutdown`]), and always when it is dropped.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{coordinator, participant};

pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Ends the shutdown future it was started with.
    stop: Option<oneshot::Sender<()>>,
    /// The server itself; aborting it is a crash.
    task: JoinHandle<anyhow::Result<()>>,
}

/// A listener on a loopback port of the system's choosing.
pub async fn listener() -> Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback port")?;
    let addr = l.local_addr()?;
    Ok((l, addr))
}

/// A listener on `addr` again, after the server that had it was killed: its socket may
/// linger for a moment, so this retries for up to 5 s.
pub async fn rebind(addr: SocketAddr) -> Result<TcpListener> {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("binding {addr} again")),
        }
    }
}

impl Server {
    /// Serves a coordinator on `listener` until shut down, killed or dropped.
    pub fn coordinator(listener: TcpListener, config: coordinator::Config) -> Result<Server> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = stop_signal();
        let task = tokio::spawn(coordinator::run(listener, config, stopped));
        Ok(Server {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Serves a participant on `listener` until shut down, killed or dropped.
    pub fn participant(listener: TcpListener, config: participant::Config) -> Result<Server> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = stop_signal();
        let task = tokio::spawn(participant::run(listener, config, stopped));
        Ok(Server {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Stops it the way a crash would: its task dropped, connections cut, nothing drained.
    pub fn kill(&self) {
        self.task.abort();
    }

    /// Whether its task has ended (it failed, was killed, or was shut down).
    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops it gracefully and waits for it, with what it ended with.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.context("the server's task")?
    }
}

/// A shutdown future for a server, and what ends it.
fn stop_signal() -> (
    oneshot::Sender<()>,
    impl std::future::Future<Output = ()> + Send,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    (stop, async {
        let _ = stopped.await;
    })
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}
