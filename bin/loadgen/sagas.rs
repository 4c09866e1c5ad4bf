//! `loadgen sagas`: sagas per second through the coordinator (docs/SAGAS.md), beside the same
//! steps written by hand, in the same run on the same two PostgreSQL servers (fsync on).
//!
//! - `twopc`: each client submits a saga of `--steps` SQL steps, alternating between the two
//!   databases (each an insert into `step_log`), and waits for it to complete (GetSaga with a
//!   wait); the coordinator makes the plan durable, then sends each step to its participant,
//!   which runs it with its barrier row.
//! - `by hand`: each client runs the same steps itself, one local transaction each on a
//!   connection of its own to each database, each with an `INSERT … ON CONFLICT DO NOTHING` of
//!   a barrier row of its own (what a careful hand-written saga needs so that a retried step
//!   applies once); no durable plan, so no recovery after a crash of the client.
//!
//! A saga is counted when it has completed; the latency is from submission to completion.

use crate::systems::{self, Runtimes, interruptible};
use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use twopc::client::saga::{Saga, SagaState};
use twopc::coordinator;
use twopc::testkit::cluster::PgCluster;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Concurrent clients (comma-separated: one run each).
    #[arg(long, value_delimiter = ',', default_values_t = [4, 16])]
    clients: Vec<usize>,
    /// Steps per saga (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [2, 5])]
    steps: Vec<usize>,
    /// One JSON object per result line instead of the table.
    #[arg(long)]
    json: bool,
}

const SCHEMA: &str =
    "CREATE TABLE step_log (saga text NOT NULL, step int NOT NULL, at timestamptz DEFAULT now());
    CREATE TABLE hand_barrier (saga text, step int, PRIMARY KEY (saga, step));";

/// What one measurement saw.
struct Measured {
    sagas: u64,
    secs: f64,
    latency: Histogram<u64>,
}

pub fn run(args: &Args) -> Result<()> {
    let runtimes = Runtimes::new()?;
    let (servers, clients) = (&runtimes.servers, &runtimes.clients);
    let pgs = servers.block_on(systems::start_databases())?;
    for pg in &pgs {
        servers.block_on(async {
            pg.client().await?.batch_execute(SCHEMA).await?;
            Ok::<_, anyhow::Error>(())
        })?;
    }
    let twopc = servers.block_on(systems::start_twopc(
        "sagas",
        coordinator::Limits::default(),
        false,
        &pgs,
        None,
    ))?;
    // Its channels belong to the runtime the clients run on.
    let client =
        clients.block_on(async { twopc::client::Client::connect(&twopc.coordinator_url()) })?;
    let urls: Vec<String> = (0..2).map(|i| twopc.participant_url(i)).collect();
    if !args.json {
        println!(
            "{:<8} {:>6} {:>8} {:>10} {:>9} {:>9} {:>9}",
            "system", "steps", "clients", "sagas/s", "p50 ms", "p99 ms", "ratio"
        );
    }
    let mut run_no = 0;
    for &steps in &args.steps {
        for &n in &args.clients {
            run_no += 1;
            let secs = Duration::from_secs(args.secs);
            let by_hand = clients.block_on(interruptible(by_hand(&pgs, steps, n, secs, run_no)))?;
            let through = clients.block_on(interruptible(through_twopc(
                &client, &urls, steps, n, secs, run_no,
            )))?;
            let rate = |m: &Measured| m.sagas as f64 / m.secs;
            for (name, m) in [("by hand", &by_hand), ("twopc", &through)] {
                let ratio = rate(m) / rate(&by_hand);
                let (p50, p99) = (
                    m.latency.value_at_quantile(0.5) as f64 / 1000.0,
                    m.latency.value_at_quantile(0.99) as f64 / 1000.0,
                );
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"mode": "sagas", "system": name, "steps": steps,
                            "clients": n, "sagas_per_s": rate(m).round(), "p50_ms": p50,
                            "p99_ms": p99, "ratio_to_by_hand": (ratio * 1000.0).round() / 1000.0})
                    );
                } else {
                    println!(
                        "{name:<8} {steps:>6} {n:>8} {:>10.0} {p50:>9.1} {p99:>9.1} {ratio:>9.2}",
                        rate(m)
                    );
                }
            }
        }
    }
    drop(twopc);
    runtimes.shutdown();
    Ok(())
}

/// `n` clients, each submitting a saga of `steps` steps and waiting for it, for `secs`.
async fn through_twopc(
    client: &twopc::client::Client,
    urls: &[String],
    steps: usize,
    n: usize,
    secs: Duration,
    run_no: usize,
) -> Result<Measured> {
    let (client, urls) = (client.clone(), urls.to_vec());
    measure(n, secs, move |c, k| {
        let (client, urls) = (client.clone(), urls.clone());
        async move {
            let id = format!("r{run_no}-c{c}-{k}");
            let mut saga = Saga::new(&id);
            for s in 0..steps {
                let url = &urls[s % urls.len()];
                let step = s as i64;
                saga = saga
                    .step(&format!("s{s}"))
                    .action(
                        url,
                        "INSERT INTO step_log (saga, step) VALUES ($1, $2)",
                        &[&id.as_str(), &step],
                    )
                    .compensation(
                        url,
                        "DELETE FROM step_log WHERE saga = $1 AND step = $2",
                        &[&id.as_str(), &step],
                    );
            }
            let ended = saga
                .submit(&client)
                .await?
                .wait(Duration::from_secs(30))
                .await?;
            if ended.state != SagaState::Completed {
                bail!("saga {id} ended {:?}: {}", ended.state, ended.reason);
            }
            Ok(())
        }
    })
    .await
}

/// The same steps run by the client itself: one local transaction each, with a barrier row.
async fn by_hand(
    pgs: &[Arc<PgCluster>],
    steps: usize,
    n: usize,
    secs: Duration,
    run_no: usize,
) -> Result<Measured> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut mine = Vec::new();
        for pg in pgs {
            mine.push(Arc::new(pg.client().await?));
        }
        conns.push(mine);
    }
    let conns = Arc::new(conns);
    measure(n, secs, move |c, k| {
        let conns = Arc::clone(&conns);
        async move {
            let id = format!("h{run_no}-c{c}-{k}");
            for s in 0..steps {
                let db = &conns[c][s % 2];
                let step = s as i32;
                db.batch_execute("BEGIN").await?;
                db.execute(
                    "INSERT INTO hand_barrier (saga, step) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&id, &step],
                )
                .await?;
                db.execute(
                    "INSERT INTO step_log (saga, step) VALUES ($1, $2)",
                    &[&id, &step],
                )
                .await?;
                db.batch_execute("COMMIT").await?;
            }
            Ok(())
        }
    })
    .await
}

/// `n` clients each running `one(client, k)` for the k-th time, over and over, for `secs`.
async fn measure<F, Fut>(n: usize, secs: Duration, one: F) -> Result<Measured>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..n {
        let (stop, one) = (Arc::clone(&stop), one.clone());
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let t0 = Instant::now();
                one(c, k).await?;
                latency.record(t0.elapsed().as_micros().max(1) as u64)?;
            }
            Ok::<_, anyhow::Error>(latency)
        }));
    }
    tokio::time::sleep(secs).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        latency.add(t.await??)?;
    }
    Ok(Measured {
        sagas: latency.len(),
        secs: started.elapsed().as_secs_f64(),
        latency,
    })
}
