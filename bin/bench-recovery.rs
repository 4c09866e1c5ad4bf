//! `bench-recovery`: how long a restarted system takes to resolve N in-doubt transactions.
//!
//! Prepared transactions hold their locks until resolved, so this is the figure that says how
//! long a crash keeps rows locked. The bench builds the state a crash leaves behind, for real:
//! N global transactions, each with a branch PREPAREd in each of two PostgreSQL databases, and
//! - `--kind committed`: a durable commit record for each in the coordinator's log (the
//!   coordinator died after its decision, before phase 2);
//! - `--kind orphan`: no record at all (it died after the participants prepared, before it
//!   logged anything): presumed abort.
//!
//! Then it starts the participants and the coordinator and times how long until
//! `pg_prepared_xacts` is empty in both databases, and checks each transaction ended the right
//! way.

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use twopc::coordinator::log::{Log, SledLog};
use twopc::coordinator::txn::{BranchRecord, BranchState, State, Txn};
use twopc::proto::TxnId;
use twopc::testkit::cluster::{PgCluster, Settings};
use twopc::testkit::system::Server;
use twopc::{coordinator, participant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Committed,
    Orphan,
}

/// Times the resolution of N in-doubt transactions after a coordinator crash.
#[derive(Parser, Debug)]
struct Args {
    /// In-doubt transactions (each prepared in two databases).
    #[arg(long, default_value_t = 1000)]
    count: usize,
    #[arg(long, value_enum, default_value_t = Kind::Committed)]
    kind: Kind,
}

const COORDINATOR_ID: &str = "bench";

async fn prepare_branches(pg: &PgCluster, ids: &[TxnId]) -> Result<Vec<u64>> {
    // Eight sessions at once; each prepares its share.
    let chunks: Vec<Vec<(usize, TxnId)>> = (0..8)
        .map(|k| {
            ids.iter()
                .copied()
                .enumerate()
                .filter(|(i, _)| i % 8 == k)
                .collect()
        })
        .collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let client = pg.client().await?;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for (i, id) in chunk {
                client.batch_execute("BEGIN").await?;
                client
                    .execute("INSERT INTO t VALUES ($1)", &[&(i as i32)])
                    .await?;
                let xid: String = client
                    .query_one("SELECT pg_current_xact_id()::text", &[])
                    .await?
                    .get(0);
                client
                    .batch_execute(&format!(
                        "PREPARE TRANSACTION 'twopc:{COORDINATOR_ID}:{id}'"
                    ))
                    .await?;
                out.push((i, xid.parse::<u64>()?));
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut xids = vec![0; ids.len()];
    for t in tasks {
        for (i, xid) in t.await?? {
            xids[i] = xid;
        }
    }
    Ok(xids)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Ctrl-C drops the run, and with it the throwaway clusters it started.
    tokio::select! {
        done = run(args) => done,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the clusters were removed"),
    }
}

async fn run(args: Args) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let max_prepared = args.count as u32 + 64;
    let settings = Settings {
        max_prepared,
        fsync: false,
    };
    let pgs = PgCluster::start_many(2, settings, Some("CREATE TABLE t (id int)")).await?;
    let participant_listeners = [
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
    ];
    let endpoints: Vec<String> = participant_listeners
        .iter()
        .map(|l| Ok(format!("http://{}", l.local_addr()?)))
        .collect::<Result<_>>()?;

    // The state a crash leaves behind.
    let ids: Vec<TxnId> = (0..args.count).map(|_| TxnId::generate()).collect();
    let started = Instant::now();
    let xids = [
        prepare_branches(&pgs[0], &ids).await?,
        prepare_branches(&pgs[1], &ids).await?,
    ];
    println!(
        "prepared {} branches in {:.1}s",
        2 * args.count,
        started.elapsed().as_secs_f64()
    );
    let data_dir = tempfile::Builder::new().prefix("twopc-bench-").tempdir()?;
    {
        let (log, _) = SledLog::open(data_dir.path(), Some(COORDINATOR_ID))?;
        for (i, ep) in endpoints.iter().enumerate() {
            log.enlist(&format!("p{}", i + 1), ep)?;
        }
        if args.kind == Kind::Committed {
            for (n, id) in ids.iter().enumerate() {
                let mut txn = Txn::begin(*id, "bench".into(), 0, 0);
                txn.state = State::Committing;
                txn.branches = (0..2)
                    .map(|i| BranchRecord {
                        participant_id: format!("p{}", i + 1),
                        endpoint: endpoints[i].clone(),
                        instance: String::new(),
                        state: BranchState::Prepared,
                        xid: xids[i][n],
                        one_phase: false,
                    })
                    .collect();
                log.put(&txn)?;
            }
        }
        log.sync().await?;
    }

    // Restart: participants first, while the coordinator is still down (their first
    // resolver pass fails), then the coordinator, whose start is the clock's zero.
    let coordinator_addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut servers = Vec::new();
    for (i, (l, pg)) in participant_listeners.into_iter().zip(&pgs).enumerate() {
        let config = participant::Config {
            advertise: Some(endpoints[i].clone()),
            ..participant::Config::new(
                format!("p{}", i + 1),
                format!("http://{coordinator_addr}"),
                pg.conn_str(),
            )
        };
        servers.push(Server::participant(l, config)?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let in_doubt = pgs[0].prepared().await? + pgs[1].prepared().await?;
    let config = coordinator::Config {
        data_dir: data_dir.path().to_path_buf(),
        etcd: None,
        id: None,
        limits: coordinator::Limits::default(),
        drain_timeout: Duration::from_secs(1),
        tls: Default::default(),
        auth: Default::default(),
    };
    let started = Instant::now();
    servers.push(Server::coordinator(
        TcpListener::bind(coordinator_addr).await?,
        config,
    )?);
    loop {
        let left = pgs[0].prepared().await? + pgs[1].prepared().await?;
        if left == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("{left} branches still prepared after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let expect = if args.kind == Kind::Committed {
        args.count as i64
    } else {
        0
    };
    for pg in &pgs {
        let rows = pg.scalar("SELECT count(*) FROM t").await?;
        if rows != expect {
            bail!("{rows} rows committed in a database, expected {expect}");
        }
    }
    println!(
        "{:?}: {} in-doubt transactions ({} prepared branches) resolved in {:.3}s after the coordinator started ({:.0} branches/s); every one ended {}",
        args.kind,
        args.count,
        in_doubt,
        elapsed.as_secs_f64(),
        in_doubt as f64 / elapsed.as_secs_f64(),
        if args.kind == Kind::Committed {
            "committed"
        } else {
            "rolled back"
        }
    );
    drop(servers);
    Ok(())
}
