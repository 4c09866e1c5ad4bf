//! `loadgen`: throughput and latency of global transactions through twopc, on this machine.
//!
//! The workload is the one `../shared/bench/pg-2pc-baseline.sh` gives PostgreSQL alone (a
//! one-row `UPDATE` on a random account among 10,000), so the two are comparable: there,
//! pgbench sends `BEGIN; UPDATE; PREPARE TRANSACTION; COMMIT PREPARED` straight to one
//! server; here, a client does Begin → Execute(UPDATE) on each of `--branches` databases →
//! Commit, and twopc does the rest. Both run with fsync on.
//!
//! Everything (two PostgreSQL servers, the coordinator, the participants and the clients)
//! shares this machine's cores, as the baseline's pgbench shares them with its server. The
//! coordinator and participants run in this process, on their own runtime.

use anyhow::Result;
use clap::Parser;
use hdrhistogram::Histogram;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
use twopc::proto::{self, Outcome};
use twopc::testkit::cluster::{PgCluster, Settings};
use twopc::{coordinator, participant};

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
}

const ACCOUNTS: i64 = 10_000;

struct Target {
    coordinator: CoordinatorClient<Channel>,
    participants: Vec<ParticipantClient<Channel>>,
}

async fn one_transaction(t: &Target, branches: usize) -> Result<Outcome> {
    let mut coordinator = t.coordinator.clone();
    let txn = coordinator
        .begin(proto::BeginRequest {
            timeout_ms: 0,
            label: String::new(),
        })
        .await?
        .into_inner()
        .txn_id;
    for p in t.participants.iter().take(branches) {
        let id = rand::rng().random_range(1..=ACCOUNTS);
        p.clone()
            .execute(proto::ExecuteRequest {
                txn_id: txn.clone(),
                sql: "UPDATE acct SET bal = bal + 1 WHERE id = $1".into(),
                params: vec![proto::Value::int(id)],
            })
            .await?;
    }
    let r = coordinator
        .commit(proto::CommitRequest { txn_id: txn })
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

async fn run(t: Arc<Target>, clients: usize, branches: usize, secs: u64) -> Result<RunResult> {
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let t = Arc::clone(&t);
            tokio::spawn(async move {
                let mut h =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < until {
                    let t0 = Instant::now();
                    match one_transaction(&t, branches).await {
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

fn main() -> Result<()> {
    let args = Args::parse();
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
    let pgs = [
        PgCluster::start_with(settings)?,
        PgCluster::start_with(settings)?,
    ];
    let data_dir = tempfile::Builder::new().prefix("twopc-load-").tempdir()?;
    let (caddr, paddrs) = servers.block_on(async {
        for pg in &pgs {
            pg.client()
                .await?
                .batch_execute(&format!(
                    "CREATE TABLE acct (id int PRIMARY KEY, bal bigint); \
                     INSERT INTO acct SELECT g, 0 FROM generate_series(1, {ACCOUNTS}) g;"
                ))
                .await?;
        }
        let cl = TcpListener::bind("127.0.0.1:0").await?;
        let caddr = cl.local_addr()?;
        let config = coordinator::Config {
            data_dir: data_dir.path().to_path_buf(),
            id: Some("load".into()),
            limits: coordinator::Limits::default(),
            drain_timeout: Duration::from_secs(1),
        };
        tokio::spawn(coordinator::run(cl, config, std::future::pending()));
        let mut paddrs = Vec::new();
        for (i, pg) in pgs.iter().enumerate() {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            paddrs.push(l.local_addr()?);
            let config = participant::Config {
                id: format!("p{}", i + 1),
                coordinator: format!("http://{caddr}"),
                advertise: None,
                postgres: pg.conn_str(),
                max_connections: 64,
                resolve_interval: Duration::from_secs(5),
            };
            tokio::spawn(participant::run(l, config, std::future::pending()));
        }
        Ok::<_, anyhow::Error>((caddr, paddrs))
    })?;

    let target = clients.block_on(async {
        Ok::<_, anyhow::Error>(Arc::new(Target {
            coordinator: CoordinatorClient::connect(format!("http://{caddr}")).await?,
            participants: vec![
                ParticipantClient::connect(format!("http://{}", paddrs[0])).await?,
                ParticipantClient::connect(format!("http://{}", paddrs[1])).await?,
            ],
        }))
    })?;

    println!(
        "{:<8} {:<9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "clients", "branches", "txn/s", "p50 ms", "p99 ms", "max ms", "failed"
    );
    for &branches in &args.branches {
        for &c in &args.clients {
            let r = clients.block_on(run(Arc::clone(&target), c, branches, args.secs))?;
            let ms = |q: f64| r.latency.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "{:<8} {:<9} {:>9.0} {:>9.2} {:>9.2} {:>9.1} {:>7}",
                c,
                branches,
                r.committed as f64 / r.elapsed.as_secs_f64(),
                ms(0.5),
                ms(0.99),
                r.latency.max() as f64 / 1000.0,
                r.failed
            );
        }
    }
    clients.shutdown_timeout(Duration::from_secs(1));
    servers.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
