//! The process `crashtest --embedded` runs in front of each database and kills: the `ledger`
//! example service (examples/ledger.rs, the participant embedded in it), compiled into this
//! binary and started as `crashtest ledger --listen … --id … …`. So the harness needs no
//! separately built example, and the service is exactly the example's code.

use clap::Parser;
use std::process::ExitCode;

#[allow(dead_code)] // its own `main` is the example's, not ours
#[path = "../../examples/ledger.rs"]
mod ledger;

/// The first argument that makes this process the ledger service.
pub const LEDGER: &str = "ledger";

/// Runs the ledger service with the arguments after [`LEDGER`], with the failpoints
/// `FAILPOINTS` arms, until SIGINT or SIGTERM.
pub fn ledger_main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = ledger::Args::parse_from(
        std::env::args()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, a)| a),
    );
    if let Err(e) = twopc::process::failpoints::setup_from_env() {
        eprintln!("ledger: {e}");
        return ExitCode::from(2);
    }
    let served = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let listener = twopc::process::bind(args.listen).await?;
                ledger::run(listener, args, twopc::process::signal::shutdown()).await
            })
        });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ledger: {e:#}");
            ExitCode::from(1)
        }
    }
}
