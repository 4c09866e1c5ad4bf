//! The coordinator: begins global transactions, enlists participants' branches, decides
//! commit or abort, and drives every branch to that decision.
//!
//! - [`txn`]: one transaction's state machine: every transition and rule, no I/O.
//! - [`core`]: the [`Coordinator`]: the log, the table of live transactions, Begin and
//!   enlistment, and the queries on them.
//! - [`commit`]: the driver of one protocol run: phase 1, the decision, phase 2 with retries.
//! - [`deadlock`]: cycles in the global wait-for graph and the victim that breaks each, no
//!   I/O; [`detector`] gathers the participants' lock waits and aborts the victims.
//! - [`recovery`]: finishing what a previous run left, and orphaned prepared branches;
//!   `retention.rs`: pruning finished transactions from the log.
//! - [`log`] and `flusher.rs`: the durable decision log on sled (group commit), and in memory.
//! - [`participants`]: how the drivers reach participants: gRPC, and a fake for tests;
//!   [`registry`]: every enlisted participant as an operator sees it, health checked.
//! - [`service`]: the `twopc.v1.Coordinator` gRPC service; [`wire`] converts to and from its
//!   types; [`error`] maps errors to statuses. `fuzz.rs` sends it arbitrary requests.

pub mod commit;
pub mod core;
pub mod deadlock;
pub mod detector;
pub mod error;
mod flusher;
#[cfg(test)]
mod fuzz;
pub mod log;
pub mod participants;
pub mod recovery;
pub mod registry;
mod retention;
#[cfg(test)]
mod scenarios;
pub mod service;
pub mod txn;
pub mod wire;

use crate::process::auth::Auth;
use crate::process::tls::Tls;
use crate::proto::coordinator_server::CoordinatorServer;
pub use core::{Coordinator, Limits};
use log::{Log, SledLog};
use participants::Participants;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Everything a coordinator process needs, whatever the source (flags, env, tests).
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// The stable id to record on first start; later starts must match or leave it unset.
    pub id: Option<String>,
    pub limits: Limits,
    /// How long shutdown waits for in-flight commits.
    pub drain_timeout: Duration,
    /// Served, and used to dial the participants.
    pub tls: Tls,
    /// Who may call; the secret sent to the participants.
    pub auth: Auth,
}

/// Opens the log in `config.data_dir` and serves on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        anyhow::anyhow!("cannot create data dir {}: {e}", config.data_dir.display())
    })?;
    let (log, id) = SledLog::open(&config.data_dir, config.id.as_deref())?;
    let core = Coordinator::new(
        id,
        log,
        config.limits.clone(),
        config.tls.clone(),
        config.auth.bearer(),
    )?;
    // Before serving: a Begin must not race the log's unfinished transactions.
    core.recover()?;
    core.spawn_orphan_scanner(config.limits.orphan_scan_interval);
    core.spawn_gauges();
    if let Some(interval) = config.limits.deadlock_interval {
        core.spawn_deadlock_detector(interval);
    }
    if let Some(interval) = config.limits.health_check_interval {
        core.spawn_health_checks(interval);
    }
    if let Some(retain) = config.limits.retain_finished {
        core.spawn_pruner(retain);
    }
    tracing::info!(coordinator_id = core.id(), addr = %listener.local_addr()?, data_dir = %config.data_dir.display(), "coordinator serving");
    serve(listener, core, &config, shutdown).await
}

/// Serves an already-open core: gRPC, health and reflection on one port.
async fn serve<L: Log, P: Participants>(
    listener: TcpListener,
    core: Arc<Coordinator<L, P>>,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let drain_timeout = config.drain_timeout;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<service::Service<L, P>>>()
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let drain_core = Arc::clone(&core);
    let drained = async move {
        shutdown.await;
        tracing::info!("shutting down: no new transactions; waiting for those in flight");
        drain_core.drain();
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        health_reporter
            .set_not_serving::<CoordinatorServer<service::Service<L, P>>>()
            .await;
        let until = tokio::time::Instant::now() + drain_timeout;
        while drain_core.live_count() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Whatever was decided is on disk already; this makes the hints durable too.
        let _ = drain_core.log.sync().await;
    };
    crate::proto::server_with(health_service, config.tls.server(), config.auth.gate())?
        .add_service(CoordinatorServer::new(service::Service::new(core)))
        .serve_with_incoming_shutdown(crate::proto::incoming(listener), drained)
        .await?;
    Ok(())
}
