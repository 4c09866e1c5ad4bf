//! Coordinator replicas on etcd (docs/HA.md): the standby sends callers to the leader, takes
//! over when the leader dies, and a leader frozen past its lease writes nothing when it wakes.
//!
//! Real parts throughout: a three-member etcd cluster, PostgreSQL clusters, the coordinator
//! binary run as replica processes (so they can be killed and frozen), and participants that
//! know every replica's URL.

use crate::support;

use std::net::SocketAddr;
#[cfg(feature = "testing")]
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};
use support::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use twopc::client::{Client, Error};
use twopc::process::leader_channel::LEADER_HEADER;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::testkit::{EtcdCluster, TestPki};

const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, note text NOT NULL)";

/// Three etcd members, two databases with a participant each, and room for replicas.
struct Cluster {
    etcd: EtcdCluster,
    pgs: Vec<PgCluster>,
    participants: Vec<Server>,
    addrs: Vec<SocketAddr>,
    data: tempfile::TempDir,
}

impl Cluster {
    /// `replicas` addresses are reserved; the participants know them all.
    async fn start(replicas: usize) -> Cluster {
        let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
            .await
            .unwrap()
            .unwrap();
        Cluster::start_on(replicas, etcd).await
    }

    async fn start_on(replicas: usize, etcd: EtcdCluster) -> Cluster {
        let addrs: Vec<SocketAddr> = (0..replicas).map(|_| free_addr()).collect();
        let urls: Vec<String> = addrs.iter().map(|a| url(*a)).collect();
        let mut pgs = Vec::new();
        let mut participants = Vec::new();
        for i in 0..2 {
            let pg = pg_with(SCHEMA).await;
            participants.push(
                start_participant_of(&format!("p{}", i + 1), &urls.join(","), &pg.conn_str()).await,
            );
            pgs.push(pg);
        }
        Cluster {
            etcd,
            pgs,
            participants,
            addrs,
            data: tempfile::tempdir().unwrap(),
        }
    }

    /// Starts replica `i` of the coordinator, as its own process.
    async fn replica(&self, i: usize, env: &[(&str, &str)]) -> Proc {
        Proc::start_with_env(
            "coordinator",
            self.addrs[i],
            &self.replica_args(i, &[]),
            env,
        )
        .await
    }

    /// A replica's flags, then `extra`.
    fn replica_args(&self, i: usize, extra: &[String]) -> Vec<String> {
        let args: Vec<String> = [
            "--log",
            "etcd",
            "--etcd-endpoints",
            &self.etcd.endpoints_flag(),
            "--etcd-prefix",
            "/twopc/ha-test/",
            "--id",
            "ha-test",
            "--lease-ms",
            "2000",
            "--data-dir",
            &self
                .data
                .path()
                .join(format!("unused-{i}"))
                .display()
                .to_string(),
            "--orphan-scan-interval-ms",
            "1000",
            "--commit-wait-ms",
            "2000",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
        .collect();
        args
    }

    fn urls(&self) -> String {
        self.addrs
            .iter()
            .map(|a| url(*a))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn participant_url(&self, i: usize) -> String {
        url(self.participants[i].addr)
    }

    /// One transfer-like transaction: a row in each database, committed.
    /// One transaction writing row `id` on both databases. The first after a failover is
    /// refused with `stale epoch` (its id was made in the old leader's epoch), which tells
    /// the client the new one: it starts again, once.
    async fn write(&self, client: &Client, id: i32) -> Result<(), Error> {
        match self.write_once(client, id).await {
            Err(e) if e.to_string().contains("stale epoch") => self.write_once(client, id).await,
            done => done,
        }
    }

    async fn write_once(&self, client: &Client, id: i32) -> Result<(), Error> {
        let txn = client.begin(Some(Duration::from_secs(20)), "ha").await?;
        for p in 0..2 {
            txn.execute(
                &self.participant_url(p),
                "INSERT INTO t VALUES ($1, 'x')",
                &[&id],
            )
            .await?;
        }
        txn.commit().await.map(|_| ())
    }

    async fn rows(&self, id: i32) -> Vec<i64> {
        let mut counts = Vec::new();
        for pg in &self.pgs {
            counts.push(scalar(pg, &format!("SELECT count(*) FROM t WHERE id = {id}")).await);
        }
        counts
    }

    async fn assert_nothing_prepared(&self) {
        for pg in &self.pgs {
            eventually("no branch is left prepared", || async {
                scalar(pg, "SELECT count(*) FROM pg_prepared_xacts").await == 0
            })
            .await;
        }
    }
}

/// Whether the replica at `addr` says it serves (it leads).
async fn leads(addr: SocketAddr) -> bool {
    let Ok(channel) = tonic::transport::Endpoint::from_shared(url(addr))
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "twopc.v1.Coordinator".into(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == tonic_health::ServingStatus::Serving as i32)
}

#[tokio::test]
async fn a_standby_sends_callers_to_the_leader_and_takes_over_when_it_dies() {
    let cluster = Cluster::start(2).await;
    let first = cluster.replica(0, &[]).await;
    eventually("the first replica leads", || leads(cluster.addrs[0])).await;
    let _second = cluster.replica(1, &[]).await;

    // A caller that reached the standby is told where the leader is (once the standby has
    // looked: until then the header is there, empty).
    let mut standby = CoordinatorClient::connect(url(cluster.addrs[1]))
        .await
        .unwrap();
    let mut named = String::new();
    for _ in 0..50 {
        let refused = standby
            .begin(twopc::proto::BeginRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        let header = refused.metadata().get(LEADER_HEADER);
        named = header
            .expect("the twopc-leader header")
            .to_str()
            .unwrap()
            .into();
        if !named.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(named, url(cluster.addrs[0]));

    // A client that knows every replica (standby first) commits through the leader.
    let standby_first = format!("{},{}", url(cluster.addrs[1]), url(cluster.addrs[0]));
    let client = Client::connect(&standby_first).unwrap();
    cluster.write(&client, 1).await.unwrap();
    assert_eq!(cluster.rows(1).await, vec![1, 1]);

    // The leader's machine dies; the standby takes over and commits.
    first.signal("KILL");
    let killed = Instant::now();
    let mut id = 2;
    loop {
        match cluster.write(&client, id).await {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    killed.elapsed() < Duration::from_secs(30),
                    "no commit after failover: {e}"
                );
                id += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    println!(
        "failover: first commit through the new leader {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(cluster.rows(id).await, vec![1, 1]);
    assert!(leads(cluster.addrs[1]).await);
    cluster.assert_nothing_prepared().await;
}

/// Needs the failpoints (`--features testing`, as scripts/test runs).
#[cfg(feature = "testing")]
#[tokio::test]
async fn a_leader_frozen_past_its_lease_records_no_decision_and_steps_down() {
    let cluster = Cluster::start(2).await;
    // One runtime thread, so the failpoint's sleep freezes the whole process, as SIGSTOP
    // would, at the worst moment: the commit decision is written in memory, not yet in etcd.
    let mut first = cluster
        .replica(
            0,
            &[
                ("FAILPOINTS", "coordinator::decision_written=sleep(4000)"),
                ("TOKIO_WORKER_THREADS", "1"),
            ],
        )
        .await;
    eventually("the first replica leads", || leads(cluster.addrs[0])).await;
    let _second = cluster.replica(1, &[]).await;
    let client = Client::connect(&url(cluster.addrs[0])).unwrap();
    let txn = client
        .begin(Some(Duration::from_secs(30)), "frozen")
        .await
        .unwrap();
    for p in 0..2 {
        txn.execute(
            &cluster.participant_url(p),
            "INSERT INTO t VALUES (7, 'x')",
            &[],
        )
        .await
        .unwrap();
    }

    let id = txn.id();
    let committing = tokio::spawn(async move { txn.commit().await });
    eventually("the standby takes over from the frozen leader", || {
        leads(cluster.addrs[1])
    })
    .await;
    let exited = first.wait_exit().await;

    // The frozen leader woke to a fence: it announced nothing and stopped by itself.
    assert!(
        committing.await.unwrap().is_err(),
        "a deposed leader announced a commit"
    );
    assert!(
        exited.code() == Some(75) || exited.signal() == Some(6),
        "the deposed leader did not stop itself (75: its lease ran out; SIGABRT: a fenced write): {exited:?}"
    );
    // The new leader found no commit decision: the transaction aborted everywhere.
    let replicas = Client::connect(&cluster.urls()).unwrap();
    let status = replicas.join(id, None).commit().await;
    assert!(matches!(status, Err(Error::Aborted { .. })), "{status:?}");
    cluster.assert_nothing_prepared().await;
    assert_eq!(cluster.rows(7).await, vec![0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_rides_out_a_lost_etcd_member_and_announces_nothing_without_a_quorum() {
    let mut cluster = Cluster::start(1).await;
    let leader = cluster.replica(0, &[]).await;
    eventually("the replica leads", || leads(cluster.addrs[0])).await;
    let client = Client::connect(&cluster.urls()).unwrap();
    cluster.write(&client, 1).await.unwrap();

    // One etcd member of three dies (a follower: the death of etcd's own leader costs an etcd
    // election, which can outlast a 2 s coordinator lease; docs/HA.md): a quorum is left, and
    // the leader keeps committing.
    let follower = cluster.etcd.a_follower().unwrap();
    tokio::task::block_in_place(|| cluster.etcd.kill(follower));
    for id in 2..12 {
        cluster.write(&client, id).await.unwrap();
    }

    // A second one dies: no quorum. Nothing can be made durable, so nothing is announced, and
    // the leader, unable to renew its lease, stops.
    let second = (0..3).find(|i| *i != follower).unwrap();
    tokio::task::block_in_place(|| cluster.etcd.kill(second));
    let undecided = async {
        let txn = client
            .begin(Some(Duration::from_secs(20)), "no quorum")
            .await?;
        for p in 0..2 {
            let sql = "INSERT INTO t VALUES (100, 'x')";
            txn.execute(&cluster.participant_url(p), sql, &[]).await?;
        }
        Ok::<_, Error>((txn.id(), txn.commit().await))
    }
    .await;
    if let Ok((_, commit)) = &undecided {
        assert!(commit.is_err(), "announced a commit without an etcd quorum");
    }
    let mut leader = leader;
    let exited = leader.wait_exit().await;
    assert!(!exited.success(), "{exited:?}");

    // Its supervisor starts it again: it stands by, refusing calls, while etcd has no quorum.
    drop(leader);
    let _restarted = cluster.replica(0, &[]).await;
    let refused = async {
        let txn = client.begin(None, "no quorum").await?;
        txn.execute(&cluster.participant_url(0), "SELECT 1", &[])
            .await
    }
    .await;
    assert!(
        matches!(
            &refused,
            Err(Error::Rpc {
                code: tonic::Code::Unavailable,
                ..
            })
        ),
        "{:?}",
        refused.err()
    );

    // The quorum comes back: the replica leads again and commits.
    tokio::task::block_in_place(|| cluster.etcd.restart(second)).unwrap();
    eventually("the replica leads again", || leads(cluster.addrs[0])).await;
    cluster.write(&client, 200).await.unwrap();
    assert_eq!(cluster.rows(200).await, vec![1, 1]);
    // The unannounced commit's etcd write may have reached the surviving member's raft log and
    // been committed once the quorum came back: then it commits everywhere, else nowhere. Its
    // Commit, asked again, tells which, and the rows agree.
    if let Ok((id, _)) = undecided {
        let rows = cluster.rows(100).await;
        match client.join(id, None).commit().await {
            Ok(_) => assert_eq!(rows, vec![1, 1]),
            // Unknown to the log (not even its Begin reached etcd): presumed aborted.
            Err(Error::Aborted { .. }) | Err(Error::Invalid(_)) => assert_eq!(rows, vec![0, 0]),
            Err(e) => panic!("no outcome once the quorum is back: {e}"),
        }
    }
    cluster.assert_nothing_prepared().await;
}

#[tokio::test]
async fn a_leader_stopped_past_its_lease_steps_down_when_it_continues() {
    let cluster = Cluster::start(2).await;
    let mut first = cluster.replica(0, &[]).await;
    eventually("the first replica leads", || leads(cluster.addrs[0])).await;
    let _second = cluster.replica(1, &[]).await;
    let client = Client::connect(&cluster.urls()).unwrap();
    cluster.write(&client, 1).await.unwrap();

    // SIGSTOP: the whole process frozen (a GC pause, a suspended VM) past its 2 s lease.
    first.signal("STOP");
    eventually("the standby takes over", || leads(cluster.addrs[1])).await;
    // The client's call to the frozen replica fails once its pings go unanswered; the next
    // goes to the next replica.
    let mut failed = 0;
    while let Err(e) = cluster.write(&client, 2).await {
        failed += 1;
        assert!(
            failed < 3,
            "the client does not get past the frozen replica: {e}"
        );
    }
    first.signal("CONT");

    // It wakes to find its lease gone by its own count, and stops without serving again.
    let exited = first.wait_exit().await;
    assert_eq!(exited.code(), Some(75), "{exited:?}");
    cluster.write(&client, 3).await.unwrap();
    for id in 1..=3 {
        assert_eq!(cluster.rows(id).await, vec![1, 1]);
    }
    cluster.assert_nothing_prepared().await;
}

/// etcd as production runs it (Kubernetes', Patroni's): clients over mutual TLS, and
/// authentication on. A replica with the CA, a client certificate and the password leads and
/// commits; one with a wrong password stops at start, saying why.
#[tokio::test]
async fn replicas_reach_an_etcd_that_wants_mutual_tls_and_a_password() {
    let pki = TestPki::new().unwrap();
    let etcd = {
        let pki = &pki;
        std::thread::scope(|s| s.spawn(|| EtcdCluster::start_tls(1, pki)).join())
            .unwrap()
            .unwrap()
    };
    etcd.enable_auth(&pki, "root", "s3cret").await.unwrap();
    let cluster = Cluster::start_on(1, etcd).await;
    let (cert, key) = pki.issue("replica").unwrap();
    let password = |name: &str, secret: &str| {
        let path = cluster.data.path().join(name);
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        path.display().to_string()
    };
    let flags = |password_file: String| -> Vec<String> {
        let ca = pki.ca_path().display().to_string();
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        [
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
            "--etcd-user",
            "root",
            "--etcd-password-file",
            &password_file,
        ]
        .map(String::from)
        .to_vec()
    };

    let refused = tokio::task::spawn_blocking({
        let args = cluster.replica_args(0, &flags(password("wrong", "guess")));
        let addr = cluster.addrs[0].to_string();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
                .args(["--listen", &addr])
                .args(&args)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("authentication failed"), "{stderr}");

    let _replica = Proc::start_with_env(
        "coordinator",
        cluster.addrs[0],
        &cluster.replica_args(0, &flags(password("right", "s3cret"))),
        &[],
    )
    .await;
    eventually("the replica leads", || leads(cluster.addrs[0])).await;
    let client = Client::connect(&cluster.urls()).unwrap();
    cluster.write(&client, 1).await.unwrap();
    assert_eq!(cluster.rows(1).await, vec![1, 1]);
    cluster.assert_nothing_prepared().await;
}
