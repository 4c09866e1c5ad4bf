//! A client's SQL against the protocol's own state, tried as a careless or hostile client
//! would (docs/SECURITY.md, "a client's SQL against the protocol's own state"): forged,
//! planted and deleted one-phase markers, settings persisted for later sessions, functions
//! shadowing the ones the protocol calls. Every client's statement runs as the participant's
//! role, so "as the participant's role, straight to PostgreSQL" is what a client can do too.
//!
//! Some participants run as their own processes with a failpoint armed, so this file needs the
//! `testing` feature.
#![cfg(feature = "testing")]

use crate::support;

use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{
    PgCluster, System, admin_scalar, eventually, free_addr, outcome, pg_with, scalar,
    start_coordinator, start_participant, url,
};
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
use twopc::proto::{self, Outcome, TxnState};

const ACCOUNTS: &str = "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
                        INSERT INTO acct VALUES (1, 100), (2, 100);";

/// What the participant's role may do to the markers, the forged ones included: counted as
/// the superuser.
async fn markers(pg: &PgCluster, committed: bool) -> i64 {
    let sql = format!("SELECT count(*) FROM twopc.one_phase_markers WHERE committed = {committed}");
    admin_scalar(pg, &sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_marker_cannot_make_a_lost_write_answer_committed() {
    let mut sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let a = sys.begin_with(120_000).await;
    sys.exec(0, &a, "UPDATE acct SET bal = bal + 9 WHERE id = 2", vec![])
        .await
        .unwrap();
    let gid = format!("twopc:%:{a}");
    let alarms_before = twopc::participant::ALARMS.load(Ordering::Relaxed);

    // Straight into the table, under any key, and into an earlier version's table by gid.
    let forge = |sql: String| {
        let sys = &sys;
        async move {
            let q = sys.begin().await;
            let refused = sys.exec(0, &q, &sql, vec![]).await;
            let commit = sys.commit(&q).await;
            (refused, outcome(commit.outcome))
        }
    };
    let into_markers = forge(
        "INSERT INTO twopc.one_phase_markers (key, committed) VALUES (sha256('x'), true)".into(),
    )
    .await;
    let into_old_table = forge(format!(
        "INSERT INTO twopc.one_phase_outcomes (gid, committed) VALUES ('{gid}', true)"
    ))
    .await;
    // Through the marker function, which the role may call: under a made-up secret.
    let through_function = forge(format!(
        "SELECT twopc.commit_marker(sha256(convert_to('{gid}', 'UTF8')), '{{}}')"
    ))
    .await;
    let alarms = twopc::participant::ALARMS.load(Ordering::Relaxed) - alarms_before;
    // p1 dies with A's branch open, and comes back.
    sys.participants[0].kill();
    sys.restart_participant(0).await;
    let commit_a = sys.commit(&a).await;

    let (err, aborted) = into_markers;
    assert_eq!(
        aborted,
        Outcome::Aborted,
        "a failed statement dooms its transaction"
    );
    assert!(
        err.unwrap_err().message().contains("permission denied"),
        "the role may not write the markers"
    );
    assert!(into_old_table.0.is_err(), "no table of markers by gid");
    assert!(
        alarms >= 1,
        "the refused write into the markers raised the alarm"
    );
    assert!(through_function.0.is_ok());
    assert_eq!(through_function.1, Outcome::Committed);
    assert_eq!(
        outcome(commit_a.outcome),
        Outcome::Aborted,
        "lost in the restart: {}",
        commit_a.reason
    );
    assert_eq!(sys.get(&a).await.state(), TxnState::Aborted);
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 2").await,
        100
    );
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_fence_cannot_abort_someone_elses_transaction() {
    let sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let a = sys.begin().await;
    sys.exec(0, &a, "UPDATE acct SET bal = bal + 9 WHERE id = 2", vec![])
        .await
        .unwrap();
    let gid = format!("twopc:%:{a}");

    // A "did not commit" row, straight in and through the fence function the role may call.
    let q = sys.begin().await;
    let planted = sys
        .exec(
            0,
            &q,
            "INSERT INTO twopc.one_phase_markers (key, committed) VALUES (sha256('x'), false)",
            vec![],
        )
        .await;
    sys.commit(&q).await;
    let q = sys.begin().await;
    let fenced = sys
        .exec(
            0,
            &q,
            &format!(
                "SELECT * FROM twopc.marker_outcome(sha256(convert_to('{gid}', 'UTF8')), true)"
            ),
            vec![],
        )
        .await;
    let fence_commit = sys.commit(&q).await;
    let commit_a = sys.commit(&a).await;

    assert!(planted.is_err(), "the role may not write the markers");
    assert!(fenced.is_ok(), "the function is the role's to call");
    assert_eq!(outcome(fence_commit.outcome), Outcome::Committed);
    assert_eq!(
        outcome(commit_a.outcome),
        Outcome::Committed,
        "{}",
        commit_a.reason
    );
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 2").await,
        109
    );
    assert_eq!(
        markers(&sys.pgs[0], false).await,
        1,
        "the fence sits beside A's marker"
    );
    assert_eq!(markers(&sys.pgs[0], true).await, 1, "A's own marker");
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_markers_cannot_make_a_committed_one_phase_transaction_answer_aborted() {
    // p1 commits A in one phase and dies before it answers: only its marker knows.
    let pg = pg_with(ACCOUNTS).await;
    let data_dir = tempfile::tempdir().unwrap();
    let limits = twopc::coordinator::Limits {
        prepare_timeout: Duration::from_secs(1),
        commit_wait: Duration::from_millis(500),
        ..support::test_limits()
    };
    let coordinator = start_coordinator(data_dir.path(), limits).await;
    let curl = url(coordinator.addr);
    let p1addr = free_addr();
    let p1args = vec![
        "--id".to_string(),
        "p1".into(),
        "--coordinator".into(),
        curl.clone(),
        "--postgres".into(),
        pg.conn_str(),
    ];
    let mut p1 = support::process(
        "participant",
        p1addr,
        &p1args,
        "participant::after_one_phase_commit=abort",
    )
    .await;
    let mut client = CoordinatorClient::connect(curl.clone()).await.unwrap();
    let a = client
        .begin(proto::BeginRequest::default())
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    ParticipantClient::connect(url(p1addr))
        .await
        .unwrap()
        .execute(proto::ExecuteRequest {
            txn_id: a.clone(),
            sql: "UPDATE acct SET bal = bal + 5 WHERE id = 2".into(),
            params: vec![],
            ..Default::default()
        })
        .await
        .unwrap();
    let first = client
        .commit(proto::CommitRequest {
            txn_id: a.clone(),
            ..Default::default()
        })
        .await;
    p1.wait_exit(support::EXIT_WAIT).await.unwrap();

    // While p1 is down, every way the role has to make the marker go.
    let attacker = pg.client().await.unwrap();
    let mut refused = Vec::new();
    for sql in [
        "DELETE FROM twopc.one_phase_markers",
        "TRUNCATE twopc.one_phase_markers",
        "UPDATE twopc.one_phase_markers SET committed = false",
        "DROP TABLE twopc.one_phase_markers",
        "ALTER TABLE twopc.one_phase_markers RENAME TO gone",
        "DROP SCHEMA twopc CASCADE",
        "SELECT key FROM twopc.one_phase_markers",
    ] {
        refused.push((sql, attacker.batch_execute(sql).await.is_err()));
    }
    let pruned: i64 = attacker
        .query_one("SELECT twopc.prune_markers(0)", &[])
        .await
        .unwrap()
        .get(0);
    attacker
        .batch_execute(
            "SELECT twopc.commit_marker(sha256('guess'), ARRAY[sha256('guess'), 'x'::bytea])",
        )
        .await
        .unwrap();
    let marked_while_down = markers(&pg, true).await;
    let _p1 = support::process("participant", p1addr, &p1args, "").await;
    let mut answer = None;
    for _ in 0..100 {
        let again = client
            .commit(proto::CommitRequest {
                txn_id: a.clone(),
                ..Default::default()
            })
            .await;
        if let Ok(resp) = again {
            answer = Some(resp.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let status = first.expect_err("nobody answered the first Commit");
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "{}",
        status.message()
    );
    for (sql, was_refused) in refused {
        assert!(was_refused, "{sql} was allowed");
    }
    assert_eq!(
        pruned, 0,
        "nothing younger than 7 days is pruned, whoever asks"
    );
    assert_eq!(marked_while_down, 1, "A's marker is still there");
    let answer = answer.expect("Commit answered once p1 was back");
    assert_eq!(
        outcome(answer.outcome),
        Outcome::Committed,
        "{}",
        answer.reason
    );
    assert_eq!(scalar(&pg, "SELECT bal FROM acct WHERE id = 2").await, 105);
    assert_eq!(
        scalar(&pg, "SELECT count(*) FROM pg_prepared_xacts").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_for_later_sessions_are_refused_and_persisted_ones_do_not_reach_the_protocol() {
    let pg = pg_with(ACCOUNTS).await;
    let data_dir = tempfile::tempdir().unwrap();
    let limits = twopc::coordinator::Limits {
        prepare_timeout: Duration::from_secs(1),
        commit_wait: Duration::from_millis(500),
        ..support::test_limits()
    };
    let coordinator = start_coordinator(data_dir.path(), limits).await;
    let curl = url(coordinator.addr);
    let p1addr = free_addr();
    let p1args = vec![
        "--id".to_string(),
        "p1".into(),
        "--coordinator".into(),
        curl.clone(),
        "--postgres".into(),
        pg.conn_str(),
    ];
    let mut p1 = support::process(
        "participant",
        p1addr,
        &p1args,
        "participant::before_one_phase_commit=abort",
    )
    .await;
    let mut client = CoordinatorClient::connect(curl.clone()).await.unwrap();
    let p1client = ParticipantClient::connect(url(p1addr)).await.unwrap();
    let a = client
        .begin(proto::BeginRequest::default())
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    let exec = |sql: &str| {
        let req = proto::ExecuteRequest {
            txn_id: a.clone(),
            sql: sql.into(),
            params: vec![],
            ..Default::default()
        };
        let mut c = p1client.clone();
        async move { c.execute(req).await }
    };
    let alter_role =
        exec("ALTER ROLE twopc_participant SET default_transaction_read_only = on").await;
    let alter_db = exec("alter database postgres set search_path = pg_temp").await;
    exec("UPDATE acct SET bal = bal + 5 WHERE id = 2")
        .await
        .unwrap();
    // What a client could still persist through a function or a DO block: a read-only default
    // would make every fence fail, a 1 ms lock timeout every wait on one.
    pg.admin_client()
        .await
        .unwrap()
        .batch_execute(
            "ALTER ROLE twopc_participant SET default_transaction_read_only = on;
             ALTER ROLE twopc_participant SET lock_timeout = 1;
             ALTER ROLE twopc_participant SET search_path = pg_temp",
        )
        .await
        .unwrap();
    let first = client
        .commit(proto::CommitRequest {
            txn_id: a.clone(),
            ..Default::default()
        })
        .await;
    p1.wait_exit(support::EXIT_WAIT).await.unwrap();
    // p1 died before its COMMIT; back, with the role's new defaults on every new session, it
    // must fence the branch on a protocol connection to answer.
    let _p1 = support::process("participant", p1addr, &p1args, "").await;
    let mut answer = None;
    for _ in 0..100 {
        if let Ok(resp) = client
            .commit(proto::CommitRequest {
                txn_id: a.clone(),
                ..Default::default()
            })
            .await
        {
            answer = Some(resp.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for refused in [alter_role, alter_db] {
        let status = refused.expect_err("persisted settings are refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("is not allowed through Execute"),
            "{}",
            status.message()
        );
    }
    assert!(first.is_err(), "nobody answered the first Commit");
    let answer = answer.expect("Commit answered once p1 was back: its fence was written");
    assert_eq!(
        outcome(answer.outcome),
        Outcome::Aborted,
        "{}",
        answer.reason
    );
    assert_eq!(
        admin_scalar(&pg, "SELECT bal FROM acct WHERE id = 2").await,
        100
    );
    assert_eq!(markers(&pg, false).await, 1, "the fence");
    assert_eq!(
        scalar(&pg, "SELECT count(*) FROM pg_prepared_xacts").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_phase_commit_is_on_with_the_readme_grants() {
    // README's role and grants, word for word but the password, then its setup command.
    let pg = PgCluster::start().unwrap();
    let admin = pg.admin_client().await.unwrap();
    admin
        .batch_execute(
            "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
             INSERT INTO acct VALUES (1, 100);
             CREATE ROLE readme_participant LOGIN;
             GRANT CONNECT ON DATABASE postgres TO readme_participant;
             GRANT USAGE ON SCHEMA public TO readme_participant;
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO readme_participant;",
        )
        .await
        .unwrap();
    let conn = pg
        .conn_str()
        .replace("twopc_participant", "readme_participant");
    assert!(conn.contains("readme_participant"), "{conn}");
    let setup = std::process::Command::new(env!("CARGO_BIN_EXE_participant"))
        .args(["--print-setup-sql", "--postgres", &conn])
        .output()
        .unwrap();
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    admin
        .batch_execute(&String::from_utf8(setup.stdout).unwrap())
        .await
        .unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(data_dir.path(), support::test_limits()).await;
    let p1 = start_participant("p1", coordinator.addr, &conn, None).await;
    let mut client = CoordinatorClient::connect(url(coordinator.addr))
        .await
        .unwrap();
    let txn = client
        .begin(proto::BeginRequest::default())
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    let p1url = url(p1.addr);
    let participant = ParticipantClient::connect(p1url).await.unwrap();
    // The participant says at start whether one-phase commit is on; a lone branch then leaves a
    // marker and is never prepared.
    eventually("p1 serves", || async {
        participant
            .clone()
            .execute(proto::ExecuteRequest {
                txn_id: txn.clone(),
                sql: "UPDATE acct SET bal = bal - 1 WHERE id = 1".into(),
                params: vec![],
                ..Default::default()
            })
            .await
            .is_ok()
    })
    .await;
    let resp = client
        .commit(proto::CommitRequest {
            txn_id: txn.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let record = client
        .get_transaction(proto::GetTransactionRequest {
            txn_id: txn.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(outcome(resp.outcome), Outcome::Committed, "{}", resp.reason);
    assert_eq!(
        record.branches[0].xid, 0,
        "committed in one phase: never prepared"
    );
    assert_eq!(markers(&pg, true).await, 1, "its marker");
    assert_eq!(
        admin_scalar(&pg, "SELECT bal FROM acct WHERE id = 1").await,
        99
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_ahead_of_pg_catalog_cannot_make_a_branch_commit_alone() {
    // The client's own pg_current_xact_id_if_assigned, which says "nothing written": were the
    // protocol to call it, p1 would vote read-only and commit on the spot.
    let sys = System::start(2).await;
    sys.setup_sql(ACCOUNTS).await;
    sys.setup_sql(
        "CREATE FUNCTION public.pg_current_xact_id_if_assigned() RETURNS xid8
             LANGUAGE sql AS 'SELECT NULL::xid8';
         CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (parent int REFERENCES parent DEFERRABLE INITIALLY DEFERRED);",
    )
    .await;
    let txn = sys.begin().await;
    sys.exec(0, &txn, "SET search_path = public, pg_catalog", vec![])
        .await
        .unwrap();
    sys.exec(
        0,
        &txn,
        "UPDATE acct SET bal = bal + 7 WHERE id = 1",
        vec![],
    )
    .await
    .unwrap();
    // p2 fails at PREPARE (the deferred constraint), so the transaction aborts.
    sys.exec(1, &txn, "INSERT INTO child VALUES (42)", vec![])
        .await
        .unwrap();
    let resp = sys.commit(&txn).await;

    assert_eq!(outcome(resp.outcome), Outcome::Aborted, "{}", resp.reason);
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await,
        100,
        "p1's branch did not commit alone"
    );
    sys.assert_nothing_prepared().await;
}
