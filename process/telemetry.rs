//! Logs and metrics, the same way in every binary.
//!
//! Logs go to stderr through `tracing`, filtered by `RUST_LOG` (default `info`), as text for
//! people or JSON lines for log pipelines. Metrics are Prometheus text at
//! `http://<--metrics-listen>/metrics`; without that flag they are not collected at all.

use clap::{Args, ValueEnum};
use std::net::SocketAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The flags every twopc server has besides its own.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Log format on stderr (filter with RUST_LOG).
    #[arg(long, env = "TWOPC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9151); off by default.
    #[arg(long, env = "TWOPC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// A TOML file of options (keys are the long flag names, e.g. `data-dir = "..."`).
    /// Flags beat environment variables, which beat the file.
    #[arg(long, env = "TWOPC_CONFIG")]
    pub config: Option<std::path::PathBuf>,
}

pub fn init_logs(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

/// Starts the Prometheus endpoint, if asked for. Needs a tokio runtime.
pub fn serve_metrics(addr: Option<SocketAddr>) -> anyhow::Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ])?
        .install()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(())
}
