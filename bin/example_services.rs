//! The example services (examples/ledger.rs, examples/audit.rs) compiled into a tool binary, so
//! that the tool can run them as processes of its own (`<tool> ledger …`, `<tool> audit …`)
//! with no separately built example to find (a clean clone's `cargo test` builds the examples
//! but leaves no binary at a path a tool can use): `crashtest --embedded` and `demo --services`.

#[allow(dead_code)] // their own `main`s are the examples', not ours
#[path = "../examples/audit.rs"]
pub mod audit;
#[allow(dead_code)]
#[path = "../examples/ledger.rs"]
pub mod ledger;

/// The first argument that makes this process the ledger service.
pub const LEDGER: &str = "ledger";
/// The first argument that makes this process the audit service.
pub const AUDIT: &str = "audit";

/// Which example service this process was started as, if any (its first argument).
pub fn asked() -> Option<String> {
    std::env::args()
        .nth(1)
        .filter(|kind| kind == LEDGER || kind == AUDIT)
}

/// Serves the example service `kind` with the arguments after it, with the failpoints
/// `FAILPOINTS` arms, until SIGINT or SIGTERM.
pub async fn serve(kind: &str) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    twopc::process::failpoints::setup_from_env().map_err(anyhow::Error::msg)?;
    // Clap sees the tool's own name, then the service's flags.
    let argv = std::env::args()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, a)| a);
    let shutdown = twopc::process::signal::shutdown();
    if kind == LEDGER {
        let args = <ledger::Args as clap::Parser>::parse_from(argv);
        ledger::run(twopc::process::bind(args.listen).await?, args, shutdown).await
    } else {
        let args = <audit::Args as clap::Parser>::parse_from(argv);
        audit::run(twopc::process::bind(args.listen).await?, args, shutdown).await
    }
}
