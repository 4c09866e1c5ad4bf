//! The coordinator: begins global transactions, enlists participants' branches, decides
//! commit or abort, and drives every branch to that decision.
//!
//! - [`txn`]: one transaction's state machine: every transition and rule, no I/O.
//! - [`saga`]: one saga's state machine (docs/SAGAS.md), no I/O; [`saga_plan`]: a submitted
//!   plan, checked; [`sagas`]: SubmitSaga and the queries, the driver of each saga, and their
//!   resumption after a restart.
//! - [`transactions`]: the [`Coordinator`]: the log, the table of live transactions, Begin and
//!   enlistment, and the queries on them.
//! - [`commit`]: the driver of one protocol run: phase 1, the decision, phase 2 with retries.
//! - [`deadlock`]: cycles in the global wait-for graph and the victim that breaks each, no
//!   I/O; [`detector`] gathers the participants' lock waits and aborts the victims.
//! - [`recovery`]: finishing what a previous run left, and orphaned prepared branches;
//!   `retention.rs`: pruning finished transactions from the log.
//! - [`log`]: the durable decision log, a backend a file: on sled (group commit), on etcd for
//!   replicas (docs/HA.md), in memory for tests; [`marker_key`]: the key in it that one-phase
//!   markers' secrets come from.
//! - `ha/`: a coordinator replica on etcd: `replica.rs` runs one, `leader.rs` elects the one
//!   that serves, `standby.rs` sends callers of the others to it.
//! - [`participants`]: how the drivers reach participants: gRPC, and a fake for tests;
//!   [`registry`]: every enlisted participant as an operator sees it, health checked.
//! - [`service`]: the `twopc.v1.Coordinator` gRPC service; [`wire`] converts to and from its
//!   types; [`error`] maps errors to statuses. `fuzz.rs` sends it arbitrary requests.

pub mod commit;
pub mod deadlock;
pub mod detector;
pub mod epoch;
pub mod error;
#[cfg(test)]
mod fuzz;
#[cfg(feature = "etcd")]
pub mod ha;
pub mod log;
pub mod marker_key;
pub mod participants;
pub mod recovery;
pub mod registry;
mod retention;
pub mod saga;
pub mod saga_plan;
#[cfg(test)]
mod saga_scenarios;
pub mod sagas;
#[cfg(test)]
mod scenarios;
pub mod service;
pub mod transactions;
pub mod txn;
pub mod wire;

use crate::process::auth::Auth;
use crate::process::tls::Tls;
use crate::proto::coordinator_server::CoordinatorServer;
use log::{Log, SledLog};
use participants::Participants;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
pub use transactions::{Coordinator, Limits};

/// Everything a coordinator process needs, whatever the source (flags, env, tests).
#[derive(Clone, Debug)]
pub struct Config {
    /// The decision log on sled, when `etcd` is `None`.
    pub data_dir: PathBuf,
    /// The decision log on etcd, and this process one replica of a coordinator cluster.
    pub etcd: Option<EtcdConfig>,
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

/// The exit status of a replica that lost the lead (docs/HA.md): not a crash; its supervisor
/// should start it again, as a standby.
pub const EXIT_DEPOSED: i32 = 75;

/// Where a replicated coordinator keeps its log and elects its leader (docs/HA.md).
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members.
    pub endpoints: Vec<String>,
    /// One coordinator cluster's keys, ending in `/`; every replica of it uses the same.
    pub prefix: String,
    /// How long the cluster stays leaderless when the leader dies (and how long a paused
    /// leader may go unrenewed before it steps down).
    pub lease_ttl: Duration,
    /// This replica's URL as clients should dial it, for the others to send them here.
    pub advertise: String,
    /// TLS to etcd (`https://` endpoints): the CA its members' certificates chain to, and this
    /// replica's client certificate when etcd asks for one. The default dials plaintext.
    pub tls: Tls,
    /// The etcd user to authenticate as, when etcd has authentication enabled.
    pub user: Option<EtcdUser>,
}

/// An etcd user name and password. The password stays out of `Debug`, and so out of logs.
#[derive(Clone)]
pub struct EtcdUser {
    pub name: String,
    pub password: String,
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Opens the log (in `config.data_dir`, or on etcd as one replica) and serves on `listener`
/// until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    if let Some(etcd) = config.etcd.clone() {
        #[cfg(feature = "etcd")]
        return ha::replica::run(listener, config, etcd, shutdown).await;
        #[cfg(not(feature = "etcd"))]
        anyhow::bail!(
            "the decision log on etcd ({:?}) needs a coordinator built with the `etcd` feature",
            etcd.endpoints
        );
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        anyhow::anyhow!("cannot create data dir {}: {e}", config.data_dir.display())
    })?;
    let (log, id) = SledLog::open(&config.data_dir, config.id.as_deref())?;
    let core = start_core(id, log, &config)?;
    tracing::info!(coordinator_id = core.id(), addr = %listener.local_addr()?, data_dir = %config.data_dir.display(), "coordinator serving");
    serve(listener, core, &config, shutdown).await
}

/// The coordinator on an open log: recovered, with its periodic work running, ready to serve.
fn start_core<L: Log>(id: String, log: L, config: &Config) -> anyhow::Result<Arc<Coordinator<L>>> {
    let core = Coordinator::new(
        id,
        log,
        config.limits.clone(),
        config.tls.clone(),
        config.auth.bearer(),
    )?;
    // Before serving: a Begin must not race the log's unfinished transactions.
    core.recover()?;
    start_background(&core, &config.limits);
    Ok(core)
}

/// The coordinator's own periodic work, once its log is open and recovered.
fn start_background<L: Log, P: Participants>(core: &Arc<Coordinator<L, P>>, limits: &Limits) {
    core.spawn_orphan_scanner(limits.orphan_scan_interval);
    core.spawn_gauges();
    if let Some(interval) = limits.deadlock_interval {
        core.spawn_deadlock_detector(interval);
    }
    if let Some(interval) = limits.health_check_interval {
        core.spawn_health_checks(interval);
    }
    if let Some(retain) = limits.retain_finished {
        core.spawn_pruner(retain);
    }
}

/// On shutdown: no new transactions, those in flight get up to `timeout`, and the hints are
/// made durable too (whatever was decided already is).
async fn drain<L: Log, P: Participants>(core: &Coordinator<L, P>, timeout: Duration) {
    core.drain();
    let until = tokio::time::Instant::now() + timeout;
    while core.live_count() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = core.log.sync().await;
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
    let (closing, enlist_end) = tokio::sync::watch::channel(false);
    let drained = async move {
        shutdown.await;
        tracing::info!("shutting down: no new transactions; waiting for those in flight");
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        health_reporter
            .set_not_serving::<CoordinatorServer<service::Service<L, P>>>()
            .await;
        drain(&drain_core, drain_timeout).await;
        let _ = closing.send(true);
    };
    crate::process::server::server_with(health_service, config.tls.server(), config.auth.gate())?
        .add_service(CoordinatorServer::new(
            service::Service::new(core).with_closing(enlist_end),
        ))
        .serve_with_incoming_shutdown(crate::process::server::incoming(listener), drained)
        .await?;
    Ok(())
}
