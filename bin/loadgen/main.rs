//! `loadgen`: what twopc costs, measured on this machine. Five tools:
//! - the sweep (no subcommand; `systems.rs`): throughput and latency of global transactions
//!   through twopc, beside hand-rolled 2PC, plain local commits, the coordinator alone and
//!   ledger services, all in the same run on the same clusters and data, so that their ratios
//!   mean something on a shared, noisy machine;
//! - `crossing N` (`crossing.rs`): distributed deadlocks, and what the detector saves;
//! - `types` (`types.rs`): result columns of types the wire has no field for, against int8;
//! - `open-txns N` (`open_txns.rs`): the coordinator's memory with N transactions in flight;
//! - `log-throughput` (`log_throughput.rs`): the decision log alone, sled against etcd;
//! - `sagas` (`sagas.rs`): sagas per second through the coordinator, beside the same steps by
//!   hand.
//!
//! The sweep, `crossing` and `types` run their PostgreSQL servers (fsync on) and twopc in this
//! process; `open-txns` runs the coordinator binary; docs/BENCHMARKS.md has their results.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod crossing;
mod log_throughput;
mod open_txns;
mod sagas;
mod services;
mod systems;
mod types;

/// Measures global transactions per second through twopc, beside what it is compared with.
///
/// With no subcommand: the sweep, every system at every number of clients and of branches.
/// Each subcommand measures another cost of twopc instead.
#[derive(Parser, Debug)]
// The sweep's flags at the top level, so invocations from before the subcommands still work.
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    sweep: systems::Args,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Distributed deadlocks: transfers crossing between the databases over hot accounts.
    ///
    /// This many transfers between the two databases over 4 hot accounts, in both orders, by
    /// `--clients` clients, each retried until it commits: distributed deadlocks, and how long
    /// they cost.
    Crossing(crossing::Args),
    /// Result columns of types the wire has no field for, against int8 columns.
    ///
    /// Times one Execute returning 20,000 rows of six columns of types the wire has no field
    /// for (numeric, timestamptz, uuid, jsonb, text[], interval), against the same rows as six
    /// int8 columns.
    Types(types::Args),
    /// The coordinator's resident memory with transactions open.
    ///
    /// Starts the coordinator binary (next to this one) on its own, opens this many
    /// transactions with two registered branches each, and reports its resident memory.
    OpenTxns(open_txns::Args),
    /// Durable decisions a second on the decision log alone, sled against etcd.
    ///
    /// Starts a three-member etcd; `--clients` writers each write a commit decision and wait
    /// for it to be durable, over and over (group commit batches them), on each log in turn.
    LogThroughput(log_throughput::Args),
    /// Sagas per second through the coordinator, beside the same steps run by hand.
    ///
    /// `--clients` clients each submit a saga of `--steps` SQL steps over the two databases
    /// and wait for it to complete, and then run the same steps themselves, one local
    /// transaction each with a barrier row, in the same run.
    Sagas(sagas::Args),
}

/// mimalloc, as in the coordinator and participant binaries: every system measured here runs
/// in this process, so all of them get the allocator the servers ship with.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        None => {
            log_server_errors();
            systems::sweep(&cli.sweep)
        }
        Some(Command::Crossing(args)) => {
            log_server_errors();
            crossing::run(args)
        }
        Some(Command::Types(args)) => {
            log_server_errors();
            types::run(args)
        }
        Some(Command::OpenTxns(args)) => open_txns::run(args),
        Some(Command::LogThroughput(args)) => log_throughput::run(args),
        Some(Command::Sagas(args)) => {
            log_server_errors();
            sagas::run(args)
        }
    }
}

/// For the tools that run twopc's servers in this process: their errors, on stderr, apart
/// from the results on stdout.
fn log_server_errors() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
