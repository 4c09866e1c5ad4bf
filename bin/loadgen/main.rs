//! `loadgen`: throughput and latency of global transactions through twopc, on this machine.
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
//! `--crossing N` instead measures distributed deadlocks: N transfers that cross between the
//! databases in both orders over 4 hot accounts, each retried until it commits.
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
//! decision log on a three-member etcd that loadgen starts (docs/HA.md). `--log-throughput`
//! measures the two logs alone: durable decisions a second under concurrent writers.

use anyhow::Result;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use twopc::participant::fake::FakeDatabase;
use twopc::participant::link::GrpcCoordinator;
use twopc::process::auth::Bearer;
use twopc::process::tls::Tls;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
use twopc::proto::{self, Outcome};
use twopc::testkit::EtcdCluster;
use twopc::testkit::cluster::{PgCluster, Settings};
use twopc::testkit::system::System as Twopc;
use twopc::{coordinator, participant};

mod services;

/// Measures global transactions per second through twopc.
#[derive(Parser, Debug)]
struct Args {
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
    /// Instead of the sweep: time one Execute returning 20,000 rows of six columns of types the
    /// wire has no field for (numeric, timestamptz, uuid, jsonb, text[], interval), against the
    /// same rows as six int8 columns.
    #[arg(long)]
    types: bool,
    /// twopc with mutual TLS on every connection and a bearer token on every call, as deployed
    /// on a network (the coordinator-only system stays plaintext).
    #[arg(long)]
    secure: bool,
    /// Instead of the sweep: this many transfers between the two databases over 4 hot
    /// accounts, in both orders, by `--clients` clients (the first value), each retried until
    /// it commits: distributed deadlocks, and how long they cost.
    #[arg(long)]
    crossing: Option<usize>,
    /// The coordinator's deadlock detector interval (ms); 0 turns it off, leaving every
    /// distributed deadlock to the transactions' deadline.
    #[arg(long, default_value_t = coordinator::Limits::default().deadlock_interval.map_or(0, |d| d.as_millis() as u64))]
    deadlock_interval_ms: u64,
    /// Instead of the sweep: start the coordinator binary (next to this one) on its own, open
    /// this many transactions with two registered branches each, and report its resident memory.
    #[arg(long)]
    open_txns: Option<usize>,
    /// Instead of the sweep: durable decisions a second on the decision log alone, sled
    /// against a three-member etcd, with `--clients` writers each writing a commit decision
    /// and waiting for it to be durable, over and over (group commit batches them).
    #[arg(long)]
    log_throughput: bool,
}

/// What a run measures; see the module header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
enum System {
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

const ACCOUNTS: i64 = 10_000;

/// A twopc system to send transactions to.
struct Target {
    coordinator: CoordinatorClient<Authed>,
    participants: Vec<ParticipantClient<Authed>>,
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

/// The types mode's tables: the same 20,000 rows as six int8 columns, and as six columns of
/// types the wire has no field for (so the participant returns them as PostgreSQL prints them).
const TYPES_TABLES: &str = "\
    CREATE TABLE int8_rows AS SELECT g::int8 a, g::int8 * 60 b, g::int8 * 7 c, g::int8 + 1 d, \
        g::int8 * 2 e, g::int8 * 1000 f FROM generate_series(1, 20000) g; \
    CREATE TABLE typed_rows AS SELECT g::numeric / 7 a, \
        timestamptz '2026-01-01 00:00+00' + g * interval '1 min' b, md5(g::text)::uuid c, \
        jsonb_build_object('g', g) d, ARRAY[g::text, 'x'] e, g * interval '1 sec' f \
        FROM generate_series(1, 20000) g;";

/// The types mode's two queries.
const TYPES_QUERIES: [(&str, &str); 2] = [
    ("int8", "SELECT * FROM int8_rows"),
    (
        "numeric,timestamptz,uuid,jsonb,text[],interval",
        "SELECT * FROM typed_rows",
    ),
];

/// Milliseconds of each Execute in the types mode (`rounds` of each query, alternating).
async fn time_types(t: &Target, rounds: usize) -> Result<Vec<(&'static str, Vec<f64>)>> {
    let mut times: Vec<(&'static str, Vec<f64>)> = TYPES_QUERIES
        .iter()
        .map(|(name, _)| (*name, Vec::new()))
        .collect();
    for _ in 0..rounds {
        for (k, (_, sql)) in TYPES_QUERIES.iter().enumerate() {
            let mut coordinator = t.coordinator.clone();
            let txn = coordinator
                .begin(proto::BeginRequest::default())
                .await?
                .into_inner()
                .txn_id;
            let started = Instant::now();
            let resp = t.participants[0]
                .clone()
                .max_decoding_message_size(usize::MAX)
                .execute(proto::ExecuteRequest {
                    txn_id: txn.clone(),
                    sql: sql.to_string(),
                    params: vec![],
                    ..Default::default()
                })
                .await?
                .into_inner();
            times[k].1.push(started.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(resp.rows.len() == 20_000, "expected 20,000 rows");
            coordinator
                .commit(proto::CommitRequest {
                    txn_id: txn,
                    ..Default::default()
                })
                .await?;
        }
    }
    Ok(times)
}

/// `work`, unless SIGINT or SIGTERM comes first: then an error, so that `main` returns and the
/// clusters it made are stopped and removed on the way out instead of left running.
async fn interruptible<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        result = work => result,
        () = twopc::process::signal::shutdown() => anyhow::bail!("interrupted"),
    }
}

/// What the crossing mode saw.
struct Crossing {
    committed: usize,
    /// Attempts aborted as a distributed deadlock's victim (SQLSTATE 40P01).
    victims: usize,
    /// Attempts aborted otherwise (a deadline, with the detector off).
    other_aborts: usize,
    elapsed: Duration,
}

/// `--crossing`: `transfers` transfers of 1..5 between the databases' accounts 1..=4, in a
/// random direction each, spread over `clients` clients; every attempt that aborts is retried.
async fn crossing(t: &Arc<Target>, clients: usize, transfers: usize) -> Result<Crossing> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let t = Arc::clone(t);
            let mine = transfers / clients + usize::from(c < transfers % clients);
            tokio::spawn(async move {
                let (mut victims, mut others) = (0, 0);
                for _ in 0..mine {
                    let (from, account, amount) = {
                        let mut rng = rand::rng();
                        (
                            rng.random_range(0..2usize),
                            rng.random_range(1..=4i64),
                            rng.random_range(1..=5i64),
                        )
                    };
                    loop {
                        match crossing_transfer(&t, from, account, amount).await? {
                            None => break,
                            Some(true) => victims += 1,
                            Some(false) => others += 1,
                        }
                    }
                }
                Ok::<_, anyhow::Error>((mine, victims, others))
            })
        })
        .collect();
    let mut out = Crossing {
        committed: 0,
        victims: 0,
        other_aborts: 0,
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        let (n, v, o) = task.await??;
        out.committed += n;
        out.victims += v;
        out.other_aborts += o;
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

/// One attempt: debit `account` in database `from`, credit it in the other. `None`: committed;
/// `Some(deadlock)`: aborted, as a deadlock's victim or otherwise.
async fn crossing_transfer(
    t: &Target,
    from: usize,
    account: i64,
    amount: i64,
) -> Result<Option<bool>> {
    let mut coordinator = t.coordinator.clone();
    let txn = coordinator
        .begin(proto::BeginRequest::default())
        .await?
        .into_inner()
        .txn_id;
    let mut failure = None;
    for (db, delta) in [(from, -amount), (1 - from, amount)] {
        let done = t.participants[db]
            .clone()
            .execute(proto::ExecuteRequest {
                txn_id: txn.clone(),
                sql: "UPDATE acct SET bal = bal + $1 WHERE id = $2".into(),
                params: vec![proto::Value::int(delta), proto::Value::int(account)],
                ..Default::default()
            })
            .await;
        if let Err(status) = done {
            failure = Some(status);
            break;
        }
    }
    let Some(status) = failure else {
        let r = coordinator
            .commit(proto::CommitRequest {
                txn_id: txn,
                ..Default::default()
            })
            .await?
            .into_inner();
        return Ok((r.outcome() != Outcome::Committed).then_some(false));
    };
    coordinator
        .abort(proto::AbortRequest {
            txn_id: txn,
            reason: String::new(),
            ..Default::default()
        })
        .await?;
    let sqlstate = status.metadata().get("x-sqlstate");
    Ok(Some(sqlstate.is_some_and(|s| s == "40P01")))
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
        deadlock_interval: (args.deadlock_interval_ms > 0)
            .then(|| Duration::from_millis(args.deadlock_interval_ms)),
        ..coordinator::Limits::default()
    }
}

/// The `twopc` system on `pgs` (`testkit::system`): a coordinator (on sled, or on `etcd`)
/// and a participant per database, served on this runtime.
async fn start_twopc(
    id: &str,
    args: &Args,
    pgs: &[Arc<PgCluster>],
    etcd: Option<&EtcdCluster>,
) -> Result<Twopc> {
    let builder = Twopc::builder()
        .on(pgs.to_vec())
        .id(id)
        .limits(limits(args))
        .secure(args.secure)
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
    args: &Args,
    etcd: Option<&EtcdCluster>,
) -> Result<(Twopc, Vec<std::net::SocketAddr>)> {
    let builder = Twopc::builder().on(Vec::new()).id(id).limits(limits(args));
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

/// `--log-throughput`: each backend of the decision log under `--clients` concurrent writers.
async fn log_throughput(args: &Args) -> Result<()> {
    use twopc::coordinator::ha::leader::Election;
    use twopc::coordinator::log::SledLog;
    use twopc::coordinator::log::{EtcdLog, EtcdTarget};

    let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(3)).await??;
    let client = etcd_client::Client::connect(etcd.endpoints(), None).await?;
    let leadership = Election {
        client: client.clone(),
        key: "/twopc/bench/leader".into(),
        advertise: "http://127.0.0.1:1".into(),
        lease_ttl: Duration::from_secs(5),
    }
    .win(|_| {})
    .await;
    let target = EtcdTarget {
        client,
        prefix: "/twopc/bench/".into(),
        fence: leadership.fence.clone(),
        write_timeout: Duration::from_secs(5),
    };
    let on_etcd = Arc::new(EtcdLog::open(target, Some("bench")).await?.0);
    let dir = tempfile::Builder::new()
        .prefix("twopc-log-bench-")
        .tempdir()?;
    let on_sled = Arc::new(SledLog::open(dir.path(), Some("bench"))?.0);
    if !args.json {
        println!("{:<6} {:>8} {:>14}", "log", "writers", "decisions/s");
    }
    for &writers in &args.clients {
        for (name, rate) in [
            ("sled", decisions_per_s(&on_sled, writers, args.secs).await?),
            ("etcd", decisions_per_s(&on_etcd, writers, args.secs).await?),
        ] {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"mode": "log", "log": name, "writers": writers, "decisions_per_s": rate.round()})
                );
            } else {
                println!("{name:<6} {writers:>8} {rate:>14.0}");
            }
        }
    }
    Ok(())
}

/// Commit decisions made durable a second by `writers` tasks, each writing one and waiting for
/// its `sync`, for `secs` seconds.
async fn decisions_per_s<L: twopc::coordinator::log::Log>(
    log: &Arc<L>,
    writers: usize,
    secs: u64,
) -> Result<f64> {
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let log = Arc::clone(log);
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    let mut txn = twopc::coordinator::txn::Txn::begin(
                        proto::TxnId::generate(),
                        "log-throughput".into(),
                        0,
                        0,
                    );
                    txn.state = twopc::coordinator::txn::State::Committing;
                    log.put(&txn)?;
                    log.sync().await?;
                    n += 1;
                }
                Ok::<_, twopc::coordinator::log::LogError>(n)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// A process's resident memory in MiB, from /proc.
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}

/// `--open-txns`: the coordinator's resident memory with `n` transactions in flight.
async fn open_txns(n: usize, json: bool) -> Result<()> {
    let bin = std::env::current_exe()?.with_file_name("coordinator");
    let dir = tempfile::Builder::new().prefix("twopc-mem-").tempdir()?;
    let addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut child = tokio::process::Command::new(&bin)
        .args(["--listen", &addr.to_string(), "--id", "mem", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", bin.display()))?;
    let pid = child.id().unwrap_or(0);
    let mut client = loop {
        match CoordinatorClient::connect(format!("http://{addr}")).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let idle = rss_mib(pid)?;
    for _ in 0..n {
        let txn = client
            .begin(proto::BeginRequest {
                timeout_ms: 3_600_000,
                label: "loadgen --open-txns".into(),
            })
            .await?
            .into_inner()
            .txn_id;
        for p in 1..=2 {
            client
                .register_branch(proto::RegisterBranchRequest {
                    txn_id: txn.clone(),
                    participant_id: format!("p{p}"),
                    endpoint: format!("http://127.0.0.1:{}", 1 + p),
                    instance_id: "loadgen".into(),
                    one_phase: false,
                    ..Default::default()
                })
                .await?;
        }
    }
    let open = rss_mib(pid)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"mode": "open-txns", "open_txns": n, "branches_each": 2, "idle_rss_mib": (idle * 10.0).round() / 10.0, "rss_mib": (open * 10.0).round() / 10.0})
        );
    } else {
        println!(
            "coordinator resident memory: {idle:.1} MiB idle, {open:.1} MiB with {n} open transactions of 2 branches each"
        );
    }
    child.kill().await?;
    Ok(())
}

/// mimalloc, as in the coordinator and participant binaries: every system measured here runs
/// in this process, so all of them get the allocator the servers ship with.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(n) = args.open_txns {
        return tokio::runtime::Runtime::new()?.block_on(open_txns(n, args.json));
    }
    if args.log_throughput {
        return tokio::runtime::Runtime::new()?.block_on(log_throughput(&args));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // The servers get their own runtime, so the clients' scheduling does not starve them.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    let settings = Settings {
        max_prepared: 200,
        fsync: true,
    };
    let schema = format!(
        "CREATE TABLE acct (id int PRIMARY KEY, bal bigint); \
         INSERT INTO acct SELECT g, 0 FROM generate_series(1, {ACCOUNTS}) g;"
    );
    let pgs = servers.block_on(PgCluster::start_many(2, settings, Some(&schema)))?;
    // The etcd systems' log: three members on this machine, fsync on, as the HA setup.
    let etcd = match args.systems.iter().any(|s| s.on_etcd()) {
        true => Some(EtcdCluster::start(3)?),
        false => None,
    };
    let twopc = servers.block_on(start_twopc("load", &args, &pgs, None))?;
    let twopc_etcd = match &etcd {
        Some(etcd) => Some(servers.block_on(start_twopc("load-e", &args, &pgs, Some(etcd)))?),
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
    let fast = servers.block_on(start_coordinator_only("load-c", &args, None))?;
    let fast_etcd = match &etcd {
        Some(etcd) => {
            Some(servers.block_on(start_coordinator_only("load-ce", &args, Some(etcd)))?)
        }
        None => None,
    };

    // How the clients reach a system's servers: its coordinator, its participants (or
    // fakes), with its client certificate and token.
    let at = |system: &Twopc, paddrs: Option<&[std::net::SocketAddr]>| {
        let paddrs = match paddrs {
            Some(addrs) => addrs.to_vec(),
            None => system.participants.iter().map(|p| p.addr).collect(),
        };
        let security = (system.client_tls.clone(), system.client_bearer.clone());
        (system.coordinator.addr, paddrs, security)
    };
    let connect = |(caddr, paddrs, (tls, bearer)): (
        std::net::SocketAddr,
        Vec<std::net::SocketAddr>,
        (Tls, Bearer),
    )| async move {
        let dial = |addr: std::net::SocketAddr| {
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
        let mut coordinator = CoordinatorClient::new(dial(caddr).await?);
        let epoch = coordinator.get_epoch(proto::GetEpochRequest {}).await?;
        Ok::<_, anyhow::Error>(Arc::new(Target {
            coordinator,
            participants,
            epoch: epoch.into_inner().epoch,
        }))
    };
    let targets = clients.block_on(async {
        Ok::<_, anyhow::Error>(Targets {
            twopc: connect(at(&twopc, None)).await?,
            coordinator_only: connect(at(&fast.0, Some(&fast.1))).await?,
            twopc_etcd: match &twopc_etcd {
                Some(system) => Some(connect(at(system, None)).await?),
                None => None,
            },
            coordinator_only_etcd: match &fast_etcd {
                Some((system, paddrs)) => Some(connect(at(system, Some(paddrs))).await?),
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

    if let Some(transfers) = args.crossing {
        let clients_n = args.clients.first().copied().unwrap_or(8);
        let total = |pgs: &[Arc<PgCluster>]| {
            servers.block_on(async {
                let mut sum = 0i64;
                for pg in pgs {
                    sum += pg.scalar("SELECT sum(bal)::int8 FROM acct").await?;
                }
                Ok::<_, anyhow::Error>(sum)
            })
        };
        let before = total(&pgs)?;
        let r = clients.block_on(interruptible(crossing(
            &targets.twopc,
            clients_n,
            transfers,
        )))?;
        let conserved = total(&pgs)? == before;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"mode": "crossing", "clients": clients_n, "transfers": r.committed,
                    "secs": (r.elapsed.as_secs_f64() * 100.0).round() / 100.0,
                    "deadlock_victims": r.victims, "other_aborts": r.other_aborts,
                    "deadlock_interval_ms": args.deadlock_interval_ms, "conserved": conserved})
            );
        } else {
            println!(
                "{} crossing transfers by {clients_n} clients over 4 hot accounts: {:.2} s; {} deadlock victims and {} other aborts, each retried; money {}",
                r.committed,
                r.elapsed.as_secs_f64(),
                r.victims,
                r.other_aborts,
                if conserved {
                    "conserved"
                } else {
                    "NOT CONSERVED"
                }
            );
        }
        clients.shutdown_timeout(Duration::from_secs(1));
        servers.shutdown_timeout(Duration::from_secs(1));
        anyhow::ensure!(conserved, "money was not conserved");
        return Ok(());
    }
    if args.types {
        servers.block_on(async {
            pgs[0].client().await?.batch_execute(TYPES_TABLES).await?;
            Ok::<_, anyhow::Error>(())
        })?;
        let times = clients.block_on(interruptible(time_types(&targets.twopc, 5)))?;
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let base = median(&times[0].1);
        for (columns, t) in &times {
            let ms = median(t);
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"mode": "types", "columns": columns, "rows": 20000, "median_ms": (ms * 10.0).round() / 10.0, "ratio_to_int8": (ms / base * 100.0).round() / 100.0})
                );
            } else {
                println!(
                    "Execute of 20,000 rows of {columns:<48} median {ms:>8.1} ms  ({:.2}x int8)",
                    ms / base
                );
            }
        }
        clients.shutdown_timeout(Duration::from_secs(1));
        servers.shutdown_timeout(Duration::from_secs(1));
        return Ok(());
    }
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
    clients.shutdown_timeout(Duration::from_secs(1));
    servers.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
