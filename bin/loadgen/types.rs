//! `loadgen types`: what result types the wire has no field for cost. One Execute returns
//! 20,000 rows of six columns of numeric, timestamptz, uuid, jsonb, text[] and interval (which
//! the participant returns as PostgreSQL prints them), timed against the same rows as six int8
//! columns; the median of 5 of each, alternating.
//!
//! It runs on the sweep's `twopc` system (`systems.rs`), started on its own.

use crate::systems::{self, Runtimes, Target, interruptible};
use anyhow::Result;
use std::time::Instant;
use twopc::coordinator;
use twopc::proto;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// One JSON object per result line instead of the sentences.
    #[arg(long)]
    json: bool,
    /// twopc with mutual TLS on every connection and a bearer token on every call.
    #[arg(long)]
    secure: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let runtimes = Runtimes::new()?;
    let (servers, clients) = (&runtimes.servers, &runtimes.clients);
    let pgs = servers.block_on(systems::start_databases())?;
    let limits = coordinator::Limits::default();
    let twopc = servers.block_on(systems::start_twopc(
        "load",
        limits,
        args.secure,
        &pgs,
        None,
    ))?;
    let target = clients.block_on(Target::connect(&twopc, None))?;

    servers.block_on(async {
        pgs[0].client().await?.batch_execute(TABLES).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    let times = clients.block_on(interruptible(time_types(&target, 5)))?;
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
    runtimes.shutdown();
    Ok(())
}

/// The same 20,000 rows as six int8 columns, and as six columns of
/// types the wire has no field for (so the participant returns them as PostgreSQL prints them).
const TABLES: &str = "\
    CREATE TABLE int8_rows AS SELECT g::int8 a, g::int8 * 60 b, g::int8 * 7 c, g::int8 + 1 d, \
        g::int8 * 2 e, g::int8 * 1000 f FROM generate_series(1, 20000) g; \
    CREATE TABLE typed_rows AS SELECT g::numeric / 7 a, \
        timestamptz '2026-01-01 00:00+00' + g * interval '1 min' b, md5(g::text)::uuid c, \
        jsonb_build_object('g', g) d, ARRAY[g::text, 'x'] e, g * interval '1 sec' f \
        FROM generate_series(1, 20000) g;";

/// The two queries, one on each table.
const QUERIES: [(&str, &str); 2] = [
    ("int8", "SELECT * FROM int8_rows"),
    (
        "numeric,timestamptz,uuid,jsonb,text[],interval",
        "SELECT * FROM typed_rows",
    ),
];

/// Milliseconds of each Execute (`rounds` of each query, alternating).
async fn time_types(t: &Target, rounds: usize) -> Result<Vec<(&'static str, Vec<f64>)>> {
    let mut times: Vec<(&'static str, Vec<f64>)> = QUERIES
        .iter()
        .map(|(name, _)| (*name, Vec::new()))
        .collect();
    for _ in 0..rounds {
        for (k, (_, sql)) in QUERIES.iter().enumerate() {
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
