//! The sweep (loadgen with no subcommand): throughput and latency of global transactions
//! through twopc, beside what twopc is measured against, on this machine.
//!
//! The workload is the one `../shared/bench/pg-2pc-baseline.sh` gives PostgreSQL alone (a
//! one-row `UPDATE` on a random account among 10,000), so the two are comparable: there,
//! pgbench sends `BEGIN; UPDATE; PREPARE TRANSACTION; COMMIT PREPARED` straight to one
//! server; here, a client does Begin → Execute(UPDATE) on each of `--branches` databases (at
//! once, as the hand-rolled client below sends its statements) → Commit, and twopc does the
//! rest. Both run with fsync on.
//!
//! Everything (two PostgreSQL servers, the coordinator, the participants and the clients)
//! shares this machine's cores, as the baseline's pgbench shares them with its server. The
//! coordinator and participants run in this process, on their own runtime.
//!
//! Four systems run the same workload in the same run, on the same clusters and data, so their
//! ratios mean something on a shared, noisy machine:
//! - `twopc`: the client goes through the coordinator and the participants, as above;
//! - `hand-rolled`: the client itself sends BEGIN, the UPDATE and PREPARE TRANSACTION to each
//!   database, then COMMIT PREPARED to each (tokio-postgres, no coordinator, no log, no gRPC,
//!   no recovery): what a team writes by hand without twopc;
//! - `plain`: BEGIN, the UPDATE and COMMIT on each database, no atomicity at all;
//! - `coordinator-only`: twopc with participants over an in-memory database that votes at once,
//!   so only the coordinator's own cost (and gRPC) remains, every commit decision still flushed.
//!
//! Three more answer the other questions (docs/PROTOCOL.md §12, `services.rs`):
//! - `twopc-decided`: `twopc` with Commit answering once the decision is durable (phase 2
//!   goes on after the answer);
//! - `services`: two ledger services with their participant embedded, called inside
//!   `transact`; `services-local`: the same services, each committing on its own.
//!
//! On request (`--systems`), `twopc-etcd` and `coordinator-only-etcd`: the same two with the
//! decision log on a three-member etcd that loadgen starts (docs/HA.md).
//!
//! The other tools on these systems (`crossing`, `types`) start what they need of them from here.

use crate::services;
use anyhow::Result;
use clap::ValueEnum;
use hdrhistogram::Histogram;
use rand::Rng;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use twopc::participant::fake::FakeDatabase;
use twopc::participant::link::GrpcCoordinator;
use twopc::process::auth::Bearer;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
use twopc::proto::{self, Outcome};
use twopc::testkit::EtcdCluster;
use twopc::testkit::cluster::{PgCluster, Settings};
use twopc::testkit::system::System as Twopc;
use twopc::{coordinator, participant};

/// The sweep's flags; with no subcommand, loadgen's own.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds per run.
    #[arg(long, default_value_t = 15)]
    secs: u64,
    /// Concurrent clients, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32])]
    clients: Vec<usize>,
    /// Databases each transaction updates (1 or 2).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2])]
    branches: Vec<usize>,
    /// The systems to measure (comma-separated), in this order; a ratio (twopc to hand-rolled,
    /// services to services-local) is shown on the row that completes its pair.
    #[arg(long, value_delimiter = ',', default_values_t = [System::HandRolled, System::Twopc, System::TwopcDecided, System::Plain, System::CoordinatorOnly, System::ServicesLocal, System::Services])]
    systems: Vec<System>,
    /// One JSON object per result line instead of the table.
    #[arg(long)]
    json: bool,
    /// Commit one-branch transactions in one phase (the default); `false` measures them
    /// through Prepare and Commit, for a before/after.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    one_phase: bool,
    /// twopc with mutual TLS on every connection and a bearer token on every call, as deployed
    /// on a network (the coordinator-only system stays plaintext).
    #[arg(long)]
    secure: bool,
    #[command(flatten)]
    detector: Detector,
}

/// The coordinator's deadlock detector, which the sweep and `crossing` both set.
#[derive(clap::Args, Debug)]
pub struct Detector {
    /// The coordinator's deadlock detector interval (ms); 0 turns it off, leaving every
    /// distributed deadlock to the transactions' deadline.
    #[arg(long, default_value_t = coordinator::Limits::default().deadlock_interval.map_or(0, |d| d.as_millis() as u64))]
    pub deadlock_interval_ms: u64,
}

impl Detector {
    pub fn interval(&self) -> Option<Duration> {
        (self.deadlock_interval_ms > 0).then(|| Duration::from_millis(self.deadlock_interval_ms))
    }
}

/// What a run measures; see the module header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum System {
    Twopc,
    HandRolled,
    Plain,
    CoordinatorOnly,
    /// `twopc`, Commit answering at the durable decision (`wait = DECIDED`).
    TwopcDecided,
    /// Two ledger services, called inside `transact` (`services.rs`).
    Services,
    /// The same services, each committing on its own: no global transaction.
    ServicesLocal,
    /// `twopc` with the decision log on a three-member etcd (docs/HA.md) instead of sled.
    TwopcEtcd,
    /// `coordinator-only` with the decision log on etcd.
    CoordinatorOnlyEtcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Twopc => "twopc",
            System::HandRolled => "hand-rolled",
            System::Plain => "plain",
            System::CoordinatorOnly => "coordinator-only",
            System::TwopcDecided => "twopc-decided",
            System::Services => "services",
            System::ServicesLocal => "services-local",
            System::TwopcEtcd => "twopc-etcd",
            System::CoordinatorOnlyEtcd => "coordinator-only-etcd",
        }
    }

    fn on_etcd(self) -> bool {
        matches!(self, System::TwopcEtcd | System::CoordinatorOnlyEtcd)
    }

    /// Each system whose ratio to another is a target, and that other.
    const PAIRS: [(System, System); 4] = [
        (System::Twopc, System::HandRolled),
        (System::TwopcDecided, System::HandRolled),
        (System::TwopcEtcd, System::HandRolled),
        (System::Services, System::ServicesLocal),
    ];

    fn services(self) -> bool {
        matches!(self, System::Services | System::ServicesLocal)
    }
}

impl std::fmt::Display for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub const ACCOUNTS: i64 = 10_000;

/// A twopc system to send transactions to.
pub struct Target {
    pub coordinator: CoordinatorClient<Authed>,
    pub participants: Vec<ParticipantClient<Authed>>,
    /// The coordinator's epoch, learned once: transactions are begun here (docs/PROTOCOL.md §12).
    epoch: u64,
}

/// A channel with the client's token (if any) on every call.
type Authed = InterceptedService<Channel, Bearer>;

/// One client's own sessions, for the systems without twopc: one per database, with the
/// UPDATE prepared once (as any hand-written client would).
struct Direct {
    sessions: Vec<(tokio_postgres::Client, tokio_postgres::Statement)>,
}

impl Direct {
    async fn connect(pgs: &[String]) -> Result<Direct> {
        let mut sessions = Vec::new();
        for conn_str in pgs {
            let (client, connection) =
                tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let update = client
                .prepare("UPDATE acct SET bal = bal + 1 WHERE id = $1")
                .await?;
            sessions.push((client, update));
        }
        Ok(Direct { sessions })
    }

    /// `hand-rolled`: phase 1 on every database at once, then phase 2 on every one at once.
    async fn two_phase(&self, branches: usize) -> Result<()> {
        let gid = format!("hand-rolled:{}", uuid::Uuid::new_v4());
        let sessions = &self.sessions[..branches];
        futures::future::try_join_all(sessions.iter().map(|(client, update)| async {
            begin_and_update(client, update).await?;
            client
                .batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
                .await
        }))
        .await?;
        let commit = format!("COMMIT PREPARED '{gid}'");
        futures::future::try_join_all(
            sessions
                .iter()
                .map(|(client, _)| client.batch_execute(&commit)),
        )
        .await?;
        Ok(())
    }

    /// `plain`: a local commit on every database at once; no atomicity.
    async fn plain(&self, branches: usize) -> Result<()> {
        futures::future::try_join_all(self.sessions[..branches].iter().map(
            |(client, update)| async {
                begin_and_update(client, update).await?;
                client.batch_execute("COMMIT").await
            },
        ))
        .await?;
        Ok(())
    }
}

/// BEGIN and the UPDATE of a random account, pipelined (one round trip).
async fn begin_and_update(
    client: &tokio_postgres::Client,
    update: &tokio_postgres::Statement,
) -> Result<(), tokio_postgres::Error> {
    let id = rand::rng().random_range(1..=ACCOUNTS as i32);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
    let (began, updated) = tokio::join!(
        client.batch_execute("BEGIN"),
        client.execute(update, &params)
    );
    began?;
    updated?;
    Ok(())
}

/// One transaction in three calls, as `twopc::client` makes them: the id made here in the
/// coordinator's epoch (no Begin), one Execute per database, Commit naming the participants.
async fn one_transaction(t: &Target, branches: usize, wait: proto::CommitWait) -> Result<Outcome> {
    let txn = proto::TxnId::generate().to_string();
    // To every database at once, as the hand-rolled client sends its statements.
    let executed = futures::future::try_join_all(t.participants.iter().take(branches).map(|p| {
        let (mut p, id) = (p.clone(), rand::rng().random_range(1..=ACCOUNTS));
        let req = proto::ExecuteRequest {
            txn_id: txn.clone(),
            sql: "UPDATE acct SET bal = bal + 1 WHERE id = $1".into(),
            params: vec![proto::Value::int(id)],
            epoch: t.epoch,
            ..Default::default()
        };
        async move { p.execute(req).await }
    }))
    .await?;
    let names = executed
        .into_iter()
        .map(|r| r.into_inner().participant_id)
        .collect();
    let r = t
        .coordinator
        .clone()
        .commit(proto::CommitRequest {
            txn_id: txn,
            participants: Some(proto::Participants { names }),
            wait: wait as i32,
        })
        .await?
        .into_inner();
    Ok(r.outcome())
}

struct RunResult {
    committed: u64,
    failed: u64,
    latency: Histogram<u64>,
    elapsed: Duration,
}

/// Where each system's transactions go.
struct Targets {
    twopc: Arc<Target>,
    coordinator_only: Arc<Target>,
    /// The same two on the etcd log, when a system asks for them.
    twopc_etcd: Option<Arc<Target>>,
    coordinator_only_etcd: Option<Arc<Target>>,
    /// Connection strings of the databases, for the systems without twopc.
    databases: Vec<String>,
    /// The ledger services, when a system asks for them.
    services: Option<Arc<services::Services>>,
}

async fn run(
    targets: &Targets,
    system: System,
    clients: usize,
    branches: usize,
    secs: u64,
) -> Result<RunResult> {
    let mut direct = Vec::new();
    if matches!(system, System::HandRolled | System::Plain) {
        for _ in 0..clients {
            direct.push(Direct::connect(&targets.databases).await?);
        }
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut direct = direct.into_iter();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let target = match system {
                System::CoordinatorOnly => Arc::clone(&targets.coordinator_only),
                System::TwopcEtcd => Arc::clone(targets.twopc_etcd.as_ref().expect("started")),
                System::CoordinatorOnlyEtcd => {
                    Arc::clone(targets.coordinator_only_etcd.as_ref().expect("started"))
                }
                _ => Arc::clone(&targets.twopc),
            };
            let own = direct.next();
            let ledgers = targets.services.clone();
            tokio::spawn(async move {
                let mut h =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < until {
                    let t0 = Instant::now();
                    let done = match (system, &own) {
                        (System::HandRolled, Some(d)) => {
                            d.two_phase(branches).await.map(|()| Outcome::Committed)
                        }
                        (System::Plain, Some(d)) => {
                            d.plain(branches).await.map(|()| Outcome::Committed)
                        }
                        (System::Services | System::ServicesLocal, _) => {
                            let ledgers = ledgers.as_ref().expect("started");
                            let global = system == System::Services;
                            ledgers
                                .transfer(branches, global)
                                .await
                                .map(|()| Outcome::Committed)
                        }
                        (System::TwopcDecided, _) => {
                            one_transaction(&target, branches, proto::CommitWait::Decided).await
                        }
                        _ => one_transaction(&target, branches, proto::CommitWait::Applied).await,
                    };
                    match done {
                        Ok(Outcome::Committed) => {
                            ok += 1;
                            h.saturating_record(t0.elapsed().as_micros() as u64);
                        }
                        _ => failed += 1,
                    }
                }
                (ok, failed, h)
            })
        })
        .collect();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut committed, mut failed) = (0, 0);
    for task in tasks {
        let (ok, f, h) = task.await?;
        committed += ok;
        failed += f;
        latency.add(h)?;
    }
    Ok(RunResult {
        committed,
        failed,
        latency,
        elapsed: started.elapsed(),
    })
}

/// The coordinator's limits in every system: the defaults, and what the flags change.
fn limits(args: &Args) -> coordinator::Limits {
    coordinator::Limits {
        one_phase: args.one_phase,
        deadlock_interval: args.detector.interval(),
        ..coordinator::Limits::default()
    }
}

/// The `twopc` system on `pgs` (`testkit::system`): a coordinator (on sled, or on `etcd`)
/// and a participant per database, served on this runtime.
pub async fn start_twopc(
    id: &str,
    limits: coordinator::Limits,
    secure: bool,
    pgs: &[Arc<PgCluster>],
    etcd: Option<&EtcdCluster>,
) -> Result<Twopc> {
    let builder = Twopc::builder()
        .on(pgs.to_vec())
        .id(id)
        .limits(limits)
        .secure(secure)
        .participant(|c| participant::Config {
            max_connections: 64,
            ..c
        });
    match etcd {
        Some(etcd) => builder.etcd(etcd).start().await,
        None => builder.start().await,
    }
}

/// The `coordinator-only` system: a coordinator whose participants vote at once, over an
/// in-memory database. Its participants' addresses beside it.
async fn start_coordinator_only(
    id: &str,
    limits: coordinator::Limits,
    etcd: Option<&EtcdCluster>,
) -> Result<(Twopc, Vec<SocketAddr>)> {
    let builder = Twopc::builder().on(Vec::new()).id(id).limits(limits);
    let system = match etcd {
        Some(etcd) => builder.etcd(etcd).start().await?,
        None => builder.start().await?,
    };
    let channel = tonic::transport::Endpoint::from_shared(system.coordinator_url())?
        .tcp_nodelay(true)
        .connect_lazy();
    let mut paddrs = Vec::new();
    for i in 0..2 {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        paddrs.push(addr);
        let core = participant::Participant::new(
            format!("mem{}", i + 1),
            format!("http://{addr}"),
            FakeDatabase::default(),
            GrpcCoordinator::new(channel.clone().into(), Default::default()),
        );
        tokio::spawn(participant::serve(l, core, std::future::pending()));
    }
    Ok((system, paddrs))
}

/// The two runtimes the in-process systems and their clients run on.
pub struct Runtimes {
    /// The servers get their own, so the clients' scheduling does not starve them.
    pub servers: Runtime,
    pub clients: Runtime,
}

impl Runtimes {
    pub fn new() -> Result<Runtimes> {
        let runtime = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
        };
        Ok(Runtimes {
            servers: runtime()?,
            clients: runtime()?,
        })
    }

    pub fn shutdown(self) {
        self.clients.shutdown_timeout(Duration::from_secs(1));
        self.servers.shutdown_timeout(Duration::from_secs(1));
    }
}

/// The two PostgreSQL servers every system runs on, fsync on, with the accounts.
pub async fn start_databases() -> Result<Vec<Arc<PgCluster>>> {
    let settings = Settings {
        max_prepared: 200,
        fsync: true,
    };
    let schema = format!(
        "CREATE TABLE acct (id int PRIMARY KEY, bal bigint); \
         INSERT INTO acct SELECT g, 0 FROM generate_series(1, {ACCOUNTS}) g;"
    );
    PgCluster::start_many(2, settings, Some(&schema)).await
}

impl Target {
    /// How a client reaches `system`: its coordinator and its participants (or the fakes at
    /// `fakes`), with its client certificate and token.
    pub async fn connect(system: &Twopc, fakes: Option<&[SocketAddr]>) -> Result<Arc<Target>> {
        let paddrs = match fakes {
            Some(addrs) => addrs.to_vec(),
            None => system.participants.iter().map(|p| p.addr).collect(),
        };
        let (tls, bearer) = (system.client_tls.clone(), system.client_bearer.clone());
        let dial = |addr: SocketAddr| {
            let (tls, bearer) = (tls.clone(), bearer.clone());
            async move {
                let url = format!("{}://{addr}", tls.scheme());
                let channel = tls.endpoint(&url)?.tcp_nodelay(true).connect().await?;
                Ok::<_, anyhow::Error>(InterceptedService::new(channel, bearer))
            }
        };
        let mut participants = Vec::new();
        for p in paddrs {
            participants.push(ParticipantClient::new(dial(p).await?));
        }
        let mut coordinator = CoordinatorClient::new(dial(system.coordinator.addr).await?);
        let epoch = coordinator.get_epoch(proto::GetEpochRequest {}).await?;
        Ok(Arc::new(Target {
            coordinator,
            participants,
            epoch: epoch.into_inner().epoch,
        }))
    }
}

/// `work`, unless SIGINT or SIGTERM comes first: then an error, so that `main` returns and the
/// clusters it made are stopped and removed on the way out instead of left running.
pub async fn interruptible<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        result = work => result,
        () = twopc::process::signal::shutdown() => anyhow::bail!("interrupted"),
    }
}

/// Every system of `args.systems` at every number of clients and of branches, one row each.
pub fn sweep(args: &Args) -> Result<()> {
    let runtimes = Runtimes::new()?;
    let (servers, clients) = (&runtimes.servers, &runtimes.clients);
    let pgs = servers.block_on(start_databases())?;
    // The etcd systems' log: three members on this machine, fsync on, as the HA setup.
    let etcd = match args.systems.iter().any(|s| s.on_etcd()) {
        true => Some(EtcdCluster::start(3)?),
        false => None,
    };
    let twopc = servers.block_on(start_twopc("load", limits(args), args.secure, &pgs, None))?;
    let twopc_etcd = match &etcd {
        Some(etcd) => Some(servers.block_on(start_twopc(
            "load-e",
            limits(args),
            args.secure,
            &pgs,
            Some(etcd),
        ))?),
        None => None,
    };

    // The services systems: two ledgers enlisting with the twopc system's coordinator.
    let ledgers = match args.systems.iter().any(|s| s.services()) {
        true => {
            anyhow::ensure!(
                !args.secure,
                "the services systems run plaintext; leave them out of --systems with --secure"
            );
            Some(servers.block_on(services::start(&twopc.coordinator_url(), &pgs))?)
        }
        false => None,
    };

    // Coordinator-only: a second coordinator, with participants over an in-memory database.
    let fast = servers.block_on(start_coordinator_only("load-c", limits(args), None))?;
    let fast_etcd = match &etcd {
        Some(etcd) => {
            Some(servers.block_on(start_coordinator_only("load-ce", limits(args), Some(etcd)))?)
        }
        None => None,
    };

    let targets = clients.block_on(async {
        Ok::<_, anyhow::Error>(Targets {
            twopc: Target::connect(&twopc, None).await?,
            coordinator_only: Target::connect(&fast.0, Some(&fast.1)).await?,
            twopc_etcd: match &twopc_etcd {
                Some(system) => Some(Target::connect(system, None).await?),
                None => None,
            },
            coordinator_only_etcd: match &fast_etcd {
                Some((system, paddrs)) => Some(Target::connect(system, Some(paddrs)).await?),
                None => None,
            },
            databases: pgs.iter().map(|pg| pg.conn_str()).collect(),
            services: match &ledgers {
                Some(urls) => Some(Arc::new(
                    services::Services::connect(&twopc.coordinator_url(), urls).await?,
                )),
                None => None,
            },
        })
    })?;

    if !args.json {
        println!(
            "{:<21} {:<8} {:<9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>14}",
            "system",
            "clients",
            "branches",
            "txn/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "failed",
            "ratio"
        );
    }
    for &branches in &args.branches {
        for &c in &args.clients {
            let mut tps = std::collections::HashMap::new();
            for &system in &args.systems {
                let r = clients
                    .block_on(interruptible(run(&targets, system, c, branches, args.secs)))?;
                let ms = |q: f64| r.latency.value_at_quantile(q) as f64 / 1000.0;
                let txn_per_s = r.committed as f64 / r.elapsed.as_secs_f64();
                tps.insert(system, txn_per_s);
                // The ratios the issue is judged by, on the row that completes a pair.
                let ratio = System::PAIRS
                    .iter()
                    .filter(|(top, base)| system == *top || system == *base)
                    .find_map(|(top, base)| Some(format!("{:.2}", tps.get(top)? / tps.get(base)?)))
                    .unwrap_or_default();
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "system": system.name(),
                            "clients": c,
                            "branches": branches,
                            "txn_per_s": (txn_per_s * 10.0).round() / 10.0,
                            "p50_ms": ms(0.5),
                            "p99_ms": ms(0.99),
                            "failed": r.failed,
                            "ratio": ratio.parse::<f64>().ok(),
                        })
                    );
                    continue;
                }
                println!(
                    "{:<21} {:<8} {:<9} {:>9.0} {:>9.2} {:>9.2} {:>9.1} {:>7} {:>14}",
                    system.name(),
                    c,
                    branches,
                    txn_per_s,
                    ms(0.5),
                    ms(0.99),
                    r.latency.max() as f64 / 1000.0,
                    r.failed,
                    ratio
                );
            }
        }
    }
    runtimes.shutdown();
    Ok(())
}
