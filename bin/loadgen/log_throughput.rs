//! `loadgen log-throughput`: the decision log alone, sled against a three-member etcd that it
//! starts on this machine (docs/HA.md). `--clients` writers each write a commit decision and
//! wait for it to be durable, over and over; group commit batches them, so what is measured is
//! durable decisions a second under that concurrency, with no coordinator around the log.

use anyhow::Result;
use std::sync::Arc;
use std::time::{Duration, Instant};
use twopc::coordinator::ha::leader::Election;
use twopc::coordinator::log::{EtcdLog, EtcdTarget, Log, LogError, SledLog};
use twopc::coordinator::txn::{State, Txn};
use twopc::proto;
use twopc::testkit::EtcdCluster;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds per log and number of writers.
    #[arg(long, default_value_t = 15)]
    secs: u64,
    /// Concurrent writers, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32])]
    clients: Vec<usize>,
    /// One JSON object per result line instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    tokio::runtime::Runtime::new()?.block_on(log_throughput(args))
}

/// Each backend of the decision log under each number of concurrent writers.
async fn log_throughput(args: &Args) -> Result<()> {
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
async fn decisions_per_s<L: Log>(log: &Arc<L>, writers: usize, secs: u64) -> Result<f64> {
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let log = Arc::clone(log);
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    let mut txn =
                        Txn::begin(proto::TxnId::generate(), "log-throughput".into(), 0, 0);
                    txn.state = State::Committing;
                    log.put(&txn)?;
                    log.sync().await?;
                    n += 1;
                }
                Ok::<_, LogError>(n)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
