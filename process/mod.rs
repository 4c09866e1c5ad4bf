//! What every twopc process shares, whatever side of the protocol it runs: the wall clock
//! ([`clock`]), how it stops ([`signal`]), where it can be made to crash on purpose ([`failpoints`]), how it reports
//! (logs and metrics, [`telemetry`]), how it is configured beyond its flags ([`config`]), and
//! how its connections are encrypted ([`tls`]) and who may call what ([`auth`]), how it
//! reaches a coordinator that may be several replicas ([`leader_channel`]), how many calls
//! share one stream ([`call_stream`]), and the gRPC server every process serves on
//! ([`server`]), how its background passes live and die with their owner ([`background`]) and
//! how long a retry waits ([`backoff`]). `fuzzing.rs` (tests only) is what both services' fuzz-style tests share.

pub mod auth;
pub mod background;
pub mod backoff;
pub mod call_stream;
pub mod clock;
pub mod config;
pub mod failpoints;
#[cfg(test)]
pub mod fuzzing;
pub mod leader_channel;
pub mod server;
pub mod signal;
pub mod telemetry;
pub mod tls;

use clap::Parser;

/// How every server binary starts: the config file into the environment, flags parsed, logs,
/// failpoints, then a runtime. A bad option ends the process here with one message.
pub fn start<A: Parser>(
    options: impl Fn(&A) -> &telemetry::Options,
) -> anyhow::Result<(A, tokio::runtime::Runtime)> {
    if let Err(e) = config::load::<A>() {
        let name = A::command().get_name().to_string();
        eprintln!("{name}: {e}");
        std::process::exit(2);
    }
    let args = A::parse();
    telemetry::init_logs(options(&args).log_format);
    failpoints::setup_from_env().map_err(anyhow::Error::msg)?;
    Ok((args, tokio::runtime::Runtime::new()?))
}

/// Binds the server's port, with a message that names it when that fails.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}
