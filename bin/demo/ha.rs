//! `demo --ha`: the bank on a coordinator of three replicas over a three-member etcd, with the
//! leader killed while transfers run (docs/HA.md).
//!
//! Everything is real: etcd members and coordinator replicas are processes (the replicas are
//! the `coordinator` binary next to this one), the participants know every replica's URL, and
//! the transfers go through `twopc::client`, which follows the leader. The demo plays the
//! replicas' supervisor too: the killed replica is started again, and comes back as a standby.

use super::{ACCOUNTS, SCHEMA, total};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use twopc::client::Client;
use twopc::participant;
use twopc::testkit::system::{ReplicaSet, Server, listener};
use twopc::testkit::{EtcdCluster, PgCluster, Settings};

const REPLICAS: usize = 3;

pub async fn run() -> Result<()> {
    println!("== Starting a three-member etcd cluster (Debian's etcd-server) on loopback");
    let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(3)).await??;
    println!("   members: {}", etcd.endpoints_flag());
    let pgs = PgCluster::start_many(2, Settings::default(), Some(SCHEMA)).await?;
    for (pg, accounts) in pgs.iter().zip(ACCOUNTS) {
        pg.client().await?.batch_execute(accounts).await?;
    }
    let (east, west) = (&*pgs[0], &*pgs[1]);
    let dir = tempfile::Builder::new()
        .prefix("twopc-demo-ha-")
        .tempdir()?;

    let program = std::env::current_exe()?.with_file_name("coordinator");
    anyhow::ensure!(
        program.is_file(),
        "{} not found (scripts/demo builds it)",
        program.display()
    );
    let mut replicas = ReplicaSet {
        program,
        etcd: &etcd,
        replicas: REPLICAS,
        id: "bank",
        dir: dir.path(),
        args: Vec::new(),
        tls: Default::default(),
        logs: true,
    }
    .build()?;
    let urls = replicas.urls();
    println!("== Starting {REPLICAS} coordinator replicas (--log etcd, 2 s lease): {urls}");
    for i in 0..REPLICAS {
        replicas.start(i, None).await?;
    }
    let first = replicas.wait_for_leader(Duration::from_secs(20)).await?;
    println!(
        "   replica {first} ({}) leads; the others stand by",
        replicas.url(first)
    );

    println!("== Starting one participant per database; each knows every replica");
    let mut participants = Vec::new();
    let mut servers = Vec::new();
    for (name, pg) in [("bank-east", east), ("bank-west", west)] {
        let (l, addr) = listener().await?;
        let config = participant::Config {
            max_connections: 16,
            resolve_interval: Duration::from_secs(1),
            ..participant::Config::new(name, urls.clone(), pg.conn_str())
        };
        servers.push(Server::participant(l, config)?);
        participants.push(format!("http://{addr}"));
    }
    let before = total(east).await? + total(west).await?;

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
    let leader_now = replicas.leader().await.context("no replica leads")?;
    let at_kill = committed.load(Ordering::Relaxed);
    println!(
        "   {at_kill} transfers committed; now SIGKILL replica {leader_now} ({}), the leader",
        replicas.url(leader_now)
    );
    replicas.procs[leader_now].kill();
    let killed = Instant::now();
    let new_leader = replicas.wait_for_leader(Duration::from_secs(20)).await?;
    println!(
        "   replica {new_leader} ({}) took over {:.1} s after the kill",
        replicas.url(new_leader),
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
    replicas.start(leader_now, None).await?;

    let mut failed = 0;
    for w in workers {
        failed += w.await?;
    }
    let after = total(east).await? + total(west).await?;
    println!(
        "== {} transfers committed in 12 s ({failed} attempts failed during the failover and were retried)",
        committed.load(Ordering::Relaxed)
    );
    let standby = !replicas.leads(leader_now).await;
    println!(
        "   money before {before}, after {after}: {}; prepared transactions left: east {}, west {}; restarted replica is a standby: {standby}",
        if before == after {
            "conserved"
        } else {
            "NOT CONSERVED"
        },
        east.prepared().await?,
        west.prepared().await?,
    );
    anyhow::ensure!(before == after, "money was not conserved");
    Ok(())
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
