//! `demo --ha`: the bank on a coordinator of three replicas over a three-member etcd, with the
//! leader killed while transfers run (docs/HA.md).
//!
//! Everything is real: etcd members and coordinator replicas are processes (the replicas are
//! the `coordinator` binary next to this one), the participants know every replica's URL, and
//! the transfers go through `twopc::client`, which follows the leader. The demo plays the
//! replicas' supervisor too: the killed replica is started again, and comes back as a standby.

use super::{prepared, start_databases, total};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use twopc::client::Client;
use twopc::participant;
use twopc::testkit::EtcdCluster;

const REPLICAS: usize = 3;

/// One coordinator replica process; killed on drop.
struct Replica {
    addr: SocketAddr,
    child: tokio::process::Child,
}

async fn start_replica(
    etcd: &EtcdCluster,
    addr: SocketAddr,
    dir: &std::path::Path,
) -> Result<Replica> {
    let bin = std::env::current_exe()?.with_file_name("coordinator");
    let child = tokio::process::Command::new(&bin)
        .args(["--listen", &addr.to_string()])
        .args(["--log", "etcd", "--etcd-endpoints", &etcd.endpoints_flag()])
        .args([
            "--etcd-prefix",
            "/twopc/bank/",
            "--id",
            "bank",
            "--lease-ms",
            "2000",
        ])
        .arg("--data-dir")
        .arg(dir.join(addr.port().to_string()))
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} (scripts/demo builds it)", bin.display()))?;
    Ok(Replica { addr, child })
}

/// Whether the replica at `addr` leads (its Coordinator service is SERVING).
async fn leads(addr: SocketAddr) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_millis(300))
        .connect()
        .await
    else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "twopc.v1.Coordinator".into(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == tonic_health::ServingStatus::Serving as i32)
}

async fn leader(replicas: &[Replica]) -> Option<usize> {
    for (i, r) in replicas.iter().enumerate() {
        if leads(r.addr).await {
            return Some(i);
        }
    }
    None
}

pub async fn run() -> Result<()> {
    println!("== Starting a three-member etcd cluster (Debian's etcd-server) on loopback");
    let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(3)).await??;
    println!("   members: {}", etcd.endpoints_flag());
    let (east, west) = start_databases().await?;
    let dir = tempfile::Builder::new()
        .prefix("twopc-demo-ha-")
        .tempdir()?;

    let addrs: Vec<SocketAddr> = (0..REPLICAS)
        .map(|_| Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?))
        .collect::<Result<_>>()?;
    let urls = addrs
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    println!("== Starting {REPLICAS} coordinator replicas (--log etcd, 2 s lease): {urls}");
    let mut replicas = Vec::new();
    for addr in &addrs {
        replicas.push(start_replica(&etcd, *addr, dir.path()).await?);
    }
    let first = wait_for_leader(&replicas, Duration::from_secs(20)).await?;
    println!(
        "   replica {} ({}) leads; the others stand by",
        first, replicas[first].addr
    );

    println!("== Starting one participant per database; each knows every replica");
    let mut participants = Vec::new();
    for (name, pg) in [("bank-east", &east), ("bank-west", &west)] {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let config = participant::Config {
            max_connections: 16,
            resolve_interval: Duration::from_secs(1),
            ..participant::Config::new(name, urls.clone(), pg.conn_str())
        };
        tokio::spawn(participant::run(l, config, std::future::pending()));
        participants.push(format!("http://{addr}"));
    }
    let before = total(&east).await? + total(&west).await?;

    println!("== Four clients move money east -> west and back, through whichever replica leads");
    let client = Client::connect(&urls)?;
    let committed = Arc::new(AtomicU64::new(0));
    let last_commit = Arc::new(std::sync::Mutex::new(Instant::now()));
    let until = Instant::now() + Duration::from_secs(12);
    let mut workers = Vec::new();
    for w in 0..4 {
        let (client, participants) = (client.clone(), participants.clone());
        let (committed, last_commit) = (Arc::clone(&committed), Arc::clone(&last_commit));
        workers.push(tokio::spawn(async move {
            let mut failed = 0u64;
            let mut n = 0i64;
            while Instant::now() < until {
                n += 1;
                let (from, to) = if n % 2 == 0 { (0, 1) } else { (1, 0) };
                let names = [["alice", "carol"][w % 2], ["bob", "dave"][w % 2]];
                match transfer(&client, &participants, names[from], from, names[to], to).await {
                    Ok(()) => {
                        committed.fetch_add(1, Ordering::Relaxed);
                        *last_commit.lock().unwrap() = Instant::now();
                    }
                    Err(_) => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            failed
        }));
    }

    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader_now = leader(&replicas).await.context("no replica leads")?;
    let at_kill = committed.load(Ordering::Relaxed);
    println!(
        "   {at_kill} transfers committed; now SIGKILL replica {leader_now} ({}), the leader",
        replicas[leader_now].addr
    );
    replicas[leader_now].child.start_kill()?;
    let _ = replicas[leader_now].child.wait().await;
    let killed = Instant::now();
    let new_leader = wait_for_leader(&replicas, Duration::from_secs(20)).await?;
    println!(
        "   replica {new_leader} ({}) took over {:.1} s after the kill",
        replicas[new_leader].addr,
        killed.elapsed().as_secs_f64()
    );
    loop {
        if committed.load(Ordering::Relaxed) > at_kill && *last_commit.lock().unwrap() > killed {
            break;
        }
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(20),
            "no commit after the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "   first transfer committed through the new leader {:.1} s after the kill",
        (*last_commit.lock().unwrap() - killed).as_secs_f64()
    );
    println!(
        "   the supervisor (this demo) restarts replica {leader_now}: it comes back as a standby"
    );
    replicas[leader_now] = start_replica(&etcd, addrs[leader_now], dir.path()).await?;

    let mut failed = 0;
    for w in workers {
        failed += w.await?;
    }
    let after = total(&east).await? + total(&west).await?;
    println!(
        "== {} transfers committed in 12 s ({failed} attempts failed during the failover and were retried)",
        committed.load(Ordering::Relaxed)
    );
    let standby = !leads(addrs[leader_now]).await;
    println!(
        "   money before {before}, after {after}: {}; prepared transactions left: east {}, west {}; restarted replica is a standby: {standby}",
        if before == after {
            "conserved"
        } else {
            "NOT CONSERVED"
        },
        prepared(&east).await?,
        prepared(&west).await?,
    );
    anyhow::ensure!(before == after, "money was not conserved");
    Ok(())
}

async fn wait_for_leader(replicas: &[Replica], within: Duration) -> Result<usize> {
    let until = Instant::now() + within;
    loop {
        if let Some(i) = leader(replicas).await {
            return Ok(i);
        }
        anyhow::ensure!(Instant::now() < until, "no replica leads after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Moves 1 from `from` (in database `from_db`) to `to` (in `to_db`), atomically.
async fn transfer(
    client: &Client,
    participants: &[String],
    from: &str,
    from_db: usize,
    to: &str,
    to_db: usize,
) -> Result<(), twopc::client::Error> {
    let txn = client
        .begin(Some(Duration::from_secs(10)), "ha transfer")
        .await?;
    txn.execute(
        &participants[from_db],
        "UPDATE acct SET bal = bal - 1 WHERE name = $1",
        &[&from],
    )
    .await?;
    txn.execute(
        &participants[to_db],
        "UPDATE acct SET bal = bal + 1 WHERE name = $1",
        &[&to],
    )
    .await?;
    txn.commit().await.map(|_| ())
}
