//! The participant: one per PostgreSQL database. Clients run SQL through it inside a branch of
//! a global transaction; the coordinator prepares, commits and rolls the branch back through it.
//!
//! - [`branch`]: one branch's state machine: every transition, no I/O.
//! - [`branches`]: the [`Participant`]: the table of open branches and the protocol steps on them.
//! - [`tombstone`]: how branches that ended are remembered, so none is ever reopened.
//! - [`statement`]: what a branch accepts: the statements Execute refuses (only the coordinator
//!   ends a branch's transaction), a request's limits, how a statement fails.
//! - [`database`]: what the branch table needs of its database, and the rule for a gid that is
//!   gone; [`postgres`] is the real one (pool, two-phase-commit statements), [`sql`] runs a
//!   client's statement (parameters, result rows).
//!   [`record`] prints anonymous records, which the server cannot print for us.
//!   [`pg_tls`] is how it reaches PostgreSQL over TLS (`sslmode`).
//! - [`marker`]: one-phase commit's markers in PostgreSQL, owned by a role of their own so
//!   that no client's SQL can forge, plant or delete one; the SQL that sets them up.
//! - [`barrier`]: a saga step's barrier row, in the same schema and out of the same reach:
//!   a repeated action runs nothing, a compensation without its action fences it off.
//! - [`link`]: the line to the coordinator (enlistments on its Enlist stream, QueryOutcome).
//! - [`gid`]: the PostgreSQL gid that names a branch and its owner.
//! - [`recovery`]: resolving in-doubt prepared branches with the coordinator.
//! - [`embedded`]: the same participant inside a service that owns its database, running the
//!   service's own statements in the ambient global transaction.
//! - [`health`]: `grpc.health.v1` status from PostgreSQL's and the coordinator's reachability.
//! - [`service`]: the `twopc.v1.Participant` gRPC service; [`wire`] converts to and from its
//!   types; [`error`] maps errors to statuses.
//! - `fake` (tests and the `testkit` feature): an in-memory database and coordinator;
//!   `fuzz.rs` sends the service arbitrary requests over them.

pub mod barrier;
pub mod branch;
pub mod branches;
pub mod database;
pub mod embedded;
pub mod error;
#[cfg(any(test, feature = "testkit"))]
pub mod fake;
#[cfg(test)]
mod fuzz;
pub mod gid;
pub mod health;
pub mod link;
pub mod marker;
pub mod pg_tls;
pub mod postgres;
pub mod record;
pub mod recovery;
#[cfg(test)]
mod scenarios;
pub mod service;
pub mod sql;
pub mod statement;
pub mod tombstone;
pub mod wire;

use crate::process::auth::{Auth, Gate};
use crate::process::leader_channel::LeaderChannel;
use crate::process::tls::Tls;
use crate::proto::participant_server::ParticipantServer;
pub use branches::Participant;
use database::Database;
use health::Scope;
use link::{CoordinatorLink, GrpcCoordinator};
use postgres::Postgres;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::net::TcpListener;

/// Branches found to have ended against the coordinator's decision. Should stay 0 forever.
pub static ALARMS: AtomicU64 = AtomicU64::new(0);

/// Everything a participant process needs, whatever the source (flags, env, tests).
#[derive(Clone, Debug)]
pub struct Config {
    /// This participant's id, unique among the coordinator's participants.
    pub id: String,
    /// The coordinator's URL; a replicated coordinator's URLs, separated by commas.
    pub coordinator: String,
    /// Where the coordinator reaches this participant; `None`: http(s)://<listen address>.
    pub advertise: Option<String>,
    /// libpq key=value string or postgres:// URL.
    pub postgres: String,
    /// The most PostgreSQL connections, so the most branches open at once.
    pub max_connections: usize,
    /// How often prepared branches are checked with the coordinator (and at start).
    pub resolve_interval: Duration,
    /// Offer one-phase commit for lone branches (needs the markers `marker::setup_sql` sets
    /// up, out of this role's reach; checked at start).
    pub one_phase: bool,
    /// Serve even when the PostgreSQL role is a superuser (refused otherwise).
    pub allow_superuser: bool,
    /// What one Execute may carry and return.
    pub limits: statement::Limits,
    /// Served, and used to dial the coordinator.
    pub tls: Tls,
    /// Who may call; the secret sent to the coordinator.
    pub auth: Auth,
}

/// The most PostgreSQL connections a participant holds for branches, unless told otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;
/// How often prepared branches are checked with the coordinator, unless told otherwise.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(5);

impl Config {
    /// The participant `id` on the database `postgres`, enlisting with `coordinator`, with
    /// every other setting as the participant binary's flags default to: plaintext, no tokens,
    /// one-phase commit offered, no superuser.
    pub fn new(
        id: impl Into<String>,
        coordinator: impl Into<String>,
        postgres: impl Into<String>,
    ) -> Config {
        Config {
            id: id.into(),
            coordinator: coordinator.into(),
            advertise: None,
            postgres: postgres.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            resolve_interval: DEFAULT_RESOLVE_INTERVAL,
            one_phase: true,
            allow_superuser: false,
            limits: Default::default(),
            tls: Default::default(),
            auth: Default::default(),
        }
    }
}

/// Connects to PostgreSQL and serves on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let advertise = config.advertise.clone().unwrap_or_else(|| {
        format!(
            "{}://{}",
            config.tls.scheme(),
            listener
                .local_addr()
                .expect("a bound listener has an address")
        )
    });
    let (core, channel) = start(&config, advertise).await?;
    tracing::info!(participant_id = %config.id, addr = %listener.local_addr()?, advertise = %core.advertise(), postgres = core.db.target(), "participant serving");

    let (reporter, health_service) = tonic_health::server::health_reporter();
    // tonic-health starts out SERVING; nothing is known yet.
    health::set(&reporter, Scope::Process, false).await;
    let watch = health::spawn(
        std::sync::Arc::downgrade(&core),
        channel,
        reporter.clone(),
        Scope::Process,
    );
    let draining = async move {
        shutdown.await;
        watch.abort();
        health::set(&reporter, Scope::Process, false).await;
    };
    let (tls, gate) = (config.tls.server(), config.auth.gate());
    serve_with(listener, core, health_service, tls, gate, draining).await
}

/// The participant's core on PostgreSQL, checked and with its resolver running, reached by
/// the coordinator at `advertise`; and the channel to the coordinator. What `run` serves, and
/// what a service embeds (`embedded.rs`).
pub(crate) async fn start(
    config: &Config,
    advertise: String,
) -> anyhow::Result<(std::sync::Arc<Participant>, LeaderChannel)> {
    let db = Postgres::new(&config.postgres, config.max_connections)?.with_limits(config.limits);
    db.check_prepared_transactions_enabled().await?;
    db.check_not_superuser(config.allow_superuser).await?;
    db.report_persisted_settings().await?;
    if config.one_phase {
        db.set_up_one_phase().await;
    }
    let channel = LeaderChannel::new(&config.coordinator, &config.tls)
        .map_err(|e| anyhow::anyhow!("coordinator URL {e}"))?;
    let coordinator = GrpcCoordinator::new(channel.clone(), config.auth.bearer());
    let core = Participant::new(config.id.clone(), advertise, db, coordinator);
    core.spawn_resolver(config.resolve_interval);
    Ok((core, channel))
}

/// Serves an already-built core, on any database and coordinator link, until `shutdown`: the
/// Participant service, health (SERVING, not watched) and reflection. For cores `run` does not
/// build, such as `loadgen`'s coordinator-only mode over an in-memory database.
pub async fn serve<D: Database, C: CoordinatorLink>(
    listener: TcpListener,
    core: std::sync::Arc<Participant<D, C>>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (_reporter, health_service) = tonic_health::server::health_reporter();
    serve_with(
        listener,
        core,
        health_service,
        None,
        Gate::default(),
        shutdown,
    )
    .await
}

async fn serve_with<D: Database, C: CoordinatorLink>(
    listener: TcpListener,
    core: std::sync::Arc<Participant<D, C>>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    tls: Option<tonic::transport::ServerTlsConfig>,
    gate: Gate,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (closing, phases_end) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = closing.send(true);
    };
    crate::process::server::server_with(health, tls, gate)?
        .add_service(ParticipantServer::new(
            service::Service::new(core).with_phases(phases_end),
        ))
        .serve_with_incoming_shutdown(crate::process::server::incoming(listener), shutdown)
        .await?;
    Ok(())
}
