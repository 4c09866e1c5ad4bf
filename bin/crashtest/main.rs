//! `crashtest`: crash-recovery tests of a whole twopc system, run as separate OS processes.
//!
//! It starts three throwaway PostgreSQL clusters, a coordinator and a participant per database,
//! runs a bank-transfer workload against them, crashes processes, and after each crash waits
//! for recovery to settle and checks that every transaction is all-or-nothing, that what
//! clients were told holds, that money is conserved and that the coordinator agrees.
//!
//! - Deterministic pass (`--failpoints all` or `a,b`): each named failpoint in turn is armed
//!   (`FAILPOINTS=<name>=abort`) in the process it lives in (p1 for `participant::*`), the
//!   workload runs until it fires, and the process is restarted without it.
//! - Soak (`--soak SECS`): random SIGKILLs of the coordinator or a participant and immediate
//!   stops of a PostgreSQL cluster, each restarted after 0-2 s, with a check every ~30 s.
//!
//! - `--embedded`: the same over `ledger` services (examples/ledger.rs, run by this binary as
//!   `crashtest ledger …`) with the participant embedded in them, driven through their own API
//!   inside `transact`; `participant::*` failpoints then fire inside the service p1.
//!
//! - `--saga`: sagas instead of transfers, over the saga failpoints (`saga.rs`).
//!
//! The files: `system.rs` the processes (on the test kit's `Proc` and `Replicas`),
//! `workload.rs` the clients, `check.rs` settling and the invariants (`testkit::bank`'s),
//! `harness/` what every pass does around a crash and the two passes, `report.rs` the table.
//!
//! Needs the `testing` feature (the binaries' failpoints): `cargo build --features testing
//! --bins && ./target/debug/crashtest`. Exits 1 on any violation or a failpoint that never
//! fired, 2 if the harness itself could not run.

mod check;
#[path = "../example_services.rs"]
mod example_services;
mod harness;
mod report;
mod saga;
mod system;
mod workload;

use anyhow::{Result, bail};
use clap::Parser;
use harness::Harness;
use std::process::ExitCode;
use system::{DATABASES, Deployment, Role, System};
use workload::Clients;

/// Crash-recovery test harness for twopc: crashes the coordinator, participants and
/// PostgreSQL under load and checks atomicity, durability and recovery.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Deterministic pass over these failpoints: `all`, or a comma-separated list of names
    /// from docs/FAILPOINTS.md (e.g. `coordinator::decision_flushed`). Default: all, unless
    /// --soak is given.
    #[arg(long)]
    failpoints: Option<String>,
    /// Random crashes for this many seconds, checking every ~30 s.
    #[arg(long)]
    soak: Option<u64>,
    /// Concurrent workload clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Seed of every random choice (printed; random by default).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the logs, timeline and coordinator data dir also when everything passes.
    #[arg(long)]
    keep: bool,
    /// Every connection over mutual TLS and every call with a bearer token, as deployed on a
    /// network (docs/SECURITY.md).
    #[arg(long)]
    secure: bool,
    /// Front each database with a `ledger` service that embeds its participant (the example's
    /// code, run by this binary), called through its own API, instead of the `participant`
    /// binary.
    #[arg(long)]
    embedded: bool,
    /// Three coordinator replicas on a three-member etcd (`--log etcd`, docs/HA.md) instead of
    /// one coordinator on sled: `coordinator::*` failpoints fire in the leader and another
    /// replica recovers; the soak also kills replicas and etcd members.
    #[arg(long)]
    ha: bool,
    /// Sagas instead of transfers (docs/SAGAS.md): the deterministic pass fires the saga
    /// failpoints (`all` means those), and every saga is checked to end completed with each
    /// action applied once, or compensated with each applied action undone once.
    #[arg(long)]
    saga: bool,
}

fn main() -> ExitCode {
    // `crashtest ledger …`: the service `--embedded` puts in front of each database.
    if let Some(kind) = example_services::asked() {
        let served = tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(example_services::serve(&kind)));
        return match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{kind}: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let failpoints = match chosen_failpoints(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crashtest: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.clients == 0 {
        eprintln!("crashtest: --clients must be at least 1");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crashtest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let dir = match tempfile::Builder::new().prefix("crashtest-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("crashtest: cannot create a temp dir: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(&args, failpoints, dir.path()));
    // Every process and cluster is gone by now (dropped inside `run`).
    drop(runtime);
    match result {
        Ok(true) if args.keep => {
            println!("crashtest: PASSED (logs kept in {})", dir.keep().display());
            ExitCode::SUCCESS
        }
        Ok(true) => {
            println!("crashtest: PASSED (logs removed)");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            let kept = dir.keep();
            println!(
                "crashtest: FAILED; logs, timeline and the coordinator's data dir are kept in {}",
                kept.display()
            );
            ExitCode::from(1)
        }
        Err(e) => {
            let kept = dir.keep();
            println!("crashtest: ERROR: {e:#}");
            println!(
                "crashtest: logs and the timeline are kept in {}",
                kept.display()
            );
            ExitCode::from(2)
        }
    }
}

/// The failpoints the deterministic pass covers, or None for no deterministic pass.
fn chosen_failpoints(args: &Args) -> Result<Option<Vec<&'static str>>> {
    let list = match args.saga {
        true => twopc::process::failpoints::SAGA,
        false => twopc::process::failpoints::ALL,
    };
    let all: Vec<&'static str> = list.iter().map(|(n, _)| *n).collect();
    let spec = match (&args.failpoints, args.soak) {
        (None, Some(_)) => return Ok(None),
        (None, None) => "all",
        (Some(s), _) => s.as_str(),
    };
    if spec.trim() == "all" {
        return Ok(Some(all));
    }
    let mut chosen = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match all.iter().find(|n| **n == name) {
            Some(n) => chosen.push(*n),
            None => bail!("unknown failpoint {name:?}; known: {}", all.join(", ")),
        }
    }
    if chosen.is_empty() {
        bail!("--failpoints names no failpoint");
    }
    Ok(Some(chosen))
}

async fn run(
    args: &Args,
    failpoints: Option<Vec<&'static str>>,
    dir: &std::path::Path,
) -> Result<bool> {
    let seed = args.seed.unwrap_or_else(rand::random);
    println!(
        "crashtest: seed {seed} (rerun with --seed {seed}), {} clients, logs in {}",
        args.clients,
        dir.display()
    );
    let deployment = match args.embedded {
        true => Deployment::Embedded,
        false => Deployment::Standalone,
    };
    if args.saga && args.embedded {
        bail!("--saga runs with standalone participants (not yet with --embedded)");
    }
    let sys = System::launch(dir, args.secure, deployment, args.ha).await?;
    let clients = Clients::new(&sys)?;
    if args.saga {
        return saga::SagaHarness::new(sys, clients, args.clients, seed)
            .await?
            .run(failpoints.as_deref(), args.soak)
            .await;
    }
    clients.open_accounts().await?;
    println!(
        "crashtest: system up: coordinator {}, participants {}, PostgreSQL ports {}",
        sys.coordinator_urls(),
        (0..DATABASES)
            .map(|i| sys.url(Role::Participant(i)))
            .collect::<Vec<_>>()
            .join(" "),
        sys.pgs
            .iter()
            .map(|p| p.port().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    Harness::new(sys, clients, args.clients, seed)
        .run(failpoints.as_deref(), args.soak)
        .await
}
