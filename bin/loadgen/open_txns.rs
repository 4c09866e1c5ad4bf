//! `loadgen open-txns N`: what transactions in flight cost the coordinator in memory. It starts
//! the coordinator binary (next to this one) as a process of its own, so that its resident
//! memory is the coordinator's alone, opens N transactions with two registered branches each
//! (an hour's timeout, so none ends while it measures), and reads that memory before and after.

use anyhow::Result;
use std::time::Duration;
use tokio::net::TcpListener;
use twopc::proto;
use twopc::proto::coordinator_client::CoordinatorClient;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Transactions to open.
    transactions: usize,
    /// One JSON object instead of the sentence.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    tokio::runtime::Runtime::new()?.block_on(open_txns(args.transactions, args.json))
}

/// A process's resident memory in MiB, from /proc.
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}

/// The coordinator's resident memory with `n` transactions in flight.
async fn open_txns(n: usize, json: bool) -> Result<()> {
    let bin = std::env::current_exe()?.with_file_name("coordinator");
    let dir = tempfile::Builder::new().prefix("twopc-mem-").tempdir()?;
    let addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut child = tokio::process::Command::new(&bin)
        .args(["--listen", &addr.to_string(), "--id", "mem", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", bin.display()))?;
    let pid = child.id().unwrap_or(0);
    let mut client = loop {
        match CoordinatorClient::connect(format!("http://{addr}")).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let idle = rss_mib(pid)?;
    for _ in 0..n {
        let txn = client
            .begin(proto::BeginRequest {
                timeout_ms: 3_600_000,
                label: "loadgen open-txns".into(),
            })
            .await?
            .into_inner()
            .txn_id;
        for p in 1..=2 {
            client
                .register_branch(proto::RegisterBranchRequest {
                    txn_id: txn.clone(),
                    participant_id: format!("p{p}"),
                    endpoint: format!("http://127.0.0.1:{}", 1 + p),
                    instance_id: "loadgen".into(),
                    one_phase: false,
                    ..Default::default()
                })
                .await?;
        }
    }
    let open = rss_mib(pid)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"mode": "open-txns", "open_txns": n, "branches_each": 2, "idle_rss_mib": (idle * 10.0).round() / 10.0, "rss_mib": (open * 10.0).round() / 10.0})
        );
    } else {
        println!(
            "coordinator resident memory: {idle:.1} MiB idle, {open:.1} MiB with {n} open transactions of 2 branches each"
        );
    }
    child.kill().await?;
    Ok(())
}
