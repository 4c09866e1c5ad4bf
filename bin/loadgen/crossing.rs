//! `loadgen crossing N`: distributed deadlocks, and how long they cost. N transfers cross
//! between the two databases in both orders over 4 hot accounts, so branches of different
//! transactions wait for each other across databases where neither PostgreSQL can see the
//! cycle; only the coordinator's detector (`--deadlock-interval-ms`) or the transactions'
//! deadline breaks it. Each transfer is retried until it commits, and the money must be
//! conserved.
//!
//! It runs on the sweep's `twopc` system (`systems.rs`), started on its own.

use crate::systems::{self, Detector, Runtimes, Target, interruptible};
use anyhow::Result;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use twopc::coordinator;
use twopc::proto::{self, Outcome};
use twopc::testkit::cluster::PgCluster;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Transfers to make.
    transfers: usize,
    /// Concurrent clients making them (the first value, if several).
    #[arg(long, value_delimiter = ',', default_values_t = [1])]
    clients: Vec<usize>,
    /// One JSON object instead of the sentence.
    #[arg(long)]
    json: bool,
    /// twopc with mutual TLS on every connection and a bearer token on every call.
    #[arg(long)]
    secure: bool,
    #[command(flatten)]
    detector: Detector,
}

pub fn run(args: &Args) -> Result<()> {
    let runtimes = Runtimes::new()?;
    let (servers, clients) = (&runtimes.servers, &runtimes.clients);
    let pgs = servers.block_on(systems::start_databases())?;
    let limits = coordinator::Limits {
        deadlock_interval: args.detector.interval(),
        ..coordinator::Limits::default()
    };
    let twopc = servers.block_on(systems::start_twopc(
        "load",
        limits,
        args.secure,
        &pgs,
        None,
    ))?;
    let target = clients.block_on(Target::connect(&twopc, None))?;

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
    let r = clients.block_on(interruptible(crossing(&target, clients_n, args.transfers)))?;
    let conserved = total(&pgs)? == before;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"mode": "crossing", "clients": clients_n, "transfers": r.committed,
                "secs": (r.elapsed.as_secs_f64() * 100.0).round() / 100.0,
                "deadlock_victims": r.victims, "other_aborts": r.other_aborts,
                "deadlock_interval_ms": args.detector.deadlock_interval_ms, "conserved": conserved})
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
    runtimes.shutdown();
    anyhow::ensure!(conserved, "money was not conserved");
    Ok(())
}

/// What the crossing transfers saw.
struct Crossing {
    committed: usize,
    /// Attempts aborted as a distributed deadlock's victim (SQLSTATE 40P01).
    victims: usize,
    /// Attempts aborted otherwise (a deadline, with the detector off).
    other_aborts: usize,
    elapsed: Duration,
}

/// `transfers` transfers of 1..5 between the databases' accounts 1..=4, in a
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
        // A victim whose blocked statement got through just before the detector's abort hears
        // of it here, from Commit: still a deadlock's victim (the reason names its SQLSTATE).
        return Ok((r.outcome() != Outcome::Committed).then(|| r.reason.contains("40P01")));
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
