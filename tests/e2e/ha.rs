//! Coordinator replicas on etcd (docs/HA.md): the standby sends callers to the leader, takes
//! over when the leader dies, and a leader frozen past its lease writes nothing when it wakes.
//!
//! Real parts throughout: a three-member etcd cluster, PostgreSQL clusters, the coordinator
//! binary run as replica processes (so they can be killed and frozen), and participants that
//! know every replica's URL.

use crate::support;

#[cfg(feature = "testing")]
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};
use support::*;
use twopc::client::{Client, Error};
use twopc::process::leader_channel::LEADER_HEADER;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::testkit::system::{ReplicaSet, Replicas, Started};
use twopc::testkit::{EtcdCluster, TestPki};

const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, note text NOT NULL)";

/// Three etcd members, two databases with a participant each, and replicas (not started)
/// that the participants all know.
struct Cluster {
    replicas: Replicas,
    participants: Vec<Server>,
    pgs: Vec<PgCluster>,
    etcd: EtcdCluster,
    _data: tempfile::TempDir,
}

impl Cluster {
    async fn start(replicas: usize) -> Cluster {
        let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
            .await
            .unwrap()
            .unwrap();
        Cluster::start_on(replicas, etcd, Vec::new()).await
    }

    /// Replicas on `etcd`, with `args` after their usual flags, each logging to a file.
    async fn start_on(replicas: usize, etcd: EtcdCluster, args: Vec<String>) -> Cluster {
        let data = tempfile::tempdir().unwrap();
        let args = [
            "--orphan-scan-interval-ms",
            "1000",
            "--commit-wait-ms",
            "2000",
        ]
        .map(String::from)
        .into_iter()
        .chain(args)
        .collect();
        let replicas = ReplicaSet {
            program: env!("CARGO_BIN_EXE_coordinator").into(),
            etcd: &etcd,
            replicas,
            id: "ha-test",
            dir: data.path(),
            args,
            tls: Default::default(),
            logs: true,
        }
        .build()
        .unwrap();
        let mut pgs = Vec::new();
        let mut participants = Vec::new();
        for i in 0..2 {
            let pg = pg_with(SCHEMA).await;
            let id = format!("p{}", i + 1);
            participants.push(start_participant_of(&id, &replicas.urls(), &pg.conn_str()).await);
            pgs.push(pg);
        }
        Cluster {
            replicas,
            participants,
            pgs,
            etcd,
            _data: data,
        }
    }

    /// Starts replica `i` of the coordinator, as its own process, and waits until it answers.
    async fn replica(&mut self, i: usize, failpoints: Option<&str>) -> &mut Proc {
        match self.replicas.start(i, failpoints).await {
            Ok(Started::Ready) => &mut self.replicas.procs[i],
            other => panic!("replica {i} did not start: {other:?}"),
        }
    }

    fn urls(&self) -> String {
        self.replicas.urls()
    }

    async fn leads(&self, i: usize) -> bool {
        self.replicas.leads(i).await
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

#[tokio::test]
async fn a_standby_sends_callers_to_the_leader_and_takes_over_when_it_dies() {
    let mut cluster = Cluster::start(2).await;
    cluster.replica(0, None).await;
    eventually("the first replica leads", || cluster.leads(0)).await;
    cluster.replica(1, None).await;

    // A caller that reached the standby is told where the leader is (once the standby has
    // looked: until then the header is there, empty).
    let mut standby = CoordinatorClient::connect(cluster.replicas.url(1))
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
    assert_eq!(named, cluster.replicas.url(0));

    // A client that knows every replica (standby first) commits through the leader.
    let standby_first = format!("{},{}", cluster.replicas.url(1), cluster.replicas.url(0));
    let client = Client::connect(&standby_first).unwrap();
    cluster.write(&client, 1).await.unwrap();
    assert_eq!(cluster.rows(1).await, vec![1, 1]);

    // The leader's machine dies; the standby takes over and commits.
    cluster.replicas.procs[0].signal("KILL").unwrap();
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
    assert!(cluster.leads(1).await);
    cluster.assert_nothing_prepared().await;
}

/// Needs the failpoints (`--features testing`, as scripts/test runs).
#[cfg(feature = "testing")]
#[tokio::test]
async fn a_leader_frozen_past_its_lease_records_no_decision_and_steps_down() {
    let mut cluster = Cluster::start(2).await;
    // One runtime thread, so the failpoint's sleep freezes the whole process, as SIGSTOP
    // would, at the worst moment: the commit decision is written in memory, not yet in etcd.
    cluster.replicas.procs[0].set_env("TOKIO_WORKER_THREADS", "1");
    cluster
        .replica(0, Some("coordinator::decision_written=sleep(4000)"))
        .await;
    eventually("the first replica leads", || cluster.leads(0)).await;
    cluster.replica(1, None).await;
    let client = Client::connect(&cluster.replicas.url(0)).unwrap();
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
        cluster.leads(1)
    })
    .await;
    let exited = cluster.replicas.procs[0]
        .wait_exit(support::EXIT_WAIT)
        .await
        .unwrap();

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
    cluster.replica(0, None).await;
    eventually("the replica leads", || cluster.leads(0)).await;
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
    let failure = match &undecided {
        Ok((_, Ok(committed))) => {
            panic!("announced a commit without an etcd quorum: {committed:?}")
        }
        Ok((_, Err(e))) | Err(e) => e,
    };
    assert!(
        matches!(
            failure,
            Error::Rpc {
                code: tonic::Code::Unavailable,
                ..
            }
        ),
        "without an etcd quorum a call fails UNAVAILABLE: {failure:?}"
    );
    let exited = cluster.replicas.procs[0]
        .wait_exit(support::EXIT_WAIT)
        .await
        .unwrap();
    assert!(!exited.success(), "{exited:?}");

    // Its supervisor starts it again: it stands by, refusing calls, while etcd has no quorum.
    cluster.replica(0, None).await;
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
    eventually("the replica leads again", || cluster.leads(0)).await;
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
    let mut cluster = Cluster::start(2).await;
    cluster.replica(0, None).await;
    eventually("the first replica leads", || cluster.leads(0)).await;
    cluster.replica(1, None).await;
    let client = Client::connect(&cluster.urls()).unwrap();
    cluster.write(&client, 1).await.unwrap();

    // SIGSTOP: the whole process frozen (a GC pause, a suspended VM) past its 2 s lease.
    cluster.replicas.procs[0].signal("STOP").unwrap();
    eventually("the standby takes over", || cluster.leads(1)).await;
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
    cluster.replicas.procs[0].signal("CONT").unwrap();

    // It wakes to find its lease gone by its own count, and stops without serving again.
    let exited = cluster.replicas.procs[0]
        .wait_exit(support::EXIT_WAIT)
        .await
        .unwrap();
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
    let (cert, key) = pki.issue("replica").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = |name: &str, secret: &str| {
        let path = dir.path().join(name);
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
    let (wrong, right) = (
        flags(password("wrong", "guess")),
        flags(password("right", "s3cret")),
    );
    // Two replica slots: the one with the wrong password, the one with the right one.
    let mut cluster = Cluster::start_on(1, etcd, right).await;
    let mut refused = ReplicaSet {
        program: env!("CARGO_BIN_EXE_coordinator").into(),
        etcd: &cluster.etcd,
        replicas: 1,
        id: "ha-test",
        dir: dir.path(),
        args: wrong,
        tls: Default::default(),
        logs: true,
    }
    .build()
    .unwrap();
    let err = refused.start(0, None).await.unwrap_err();
    let said = refused.procs[0].run_log();
    assert!(said.contains("authentication failed"), "{err:#}\n{said}");

    cluster.replica(0, None).await;
    eventually("the replica leads", || cluster.leads(0)).await;
    let client = Client::connect(&cluster.urls()).unwrap();
    cluster.write(&client, 1).await.unwrap();
    assert_eq!(cluster.rows(1).await, vec![1, 1]);
    cluster.assert_nothing_prepared().await;
}
