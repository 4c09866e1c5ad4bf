//! Everything that ends in abort, and the errors a client can make.

use crate::support;

use std::time::Duration;
use support::{System, eventually, int, outcome, test_limits};
use tonic::Code;
use twopc::coordinator::Limits;
use twopc::proto::{self, BranchState, Outcome, TxnState};

const ACCOUNTS: &str = "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
                        INSERT INTO acct VALUES (1, 100), (2, 100);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_statement_votes_no_and_aborts_everywhere() {
    let sys = System::start(2).await;
    sys.setup_sql(ACCOUNTS).await;
    let txn = sys.begin().await;
    sys.exec(
        0,
        &txn,
        "UPDATE acct SET bal = bal - 10 WHERE id = 1",
        vec![],
    )
    .await
    .unwrap();

    let failed = sys
        .exec(1, &txn, "INSERT INTO acct VALUES (1, 0)", vec![])
        .await
        .unwrap_err();
    let later = sys.exec(1, &txn, "SELECT 1", vec![]).await.unwrap_err();
    let resp = sys.commit(&txn).await;

    assert_eq!(failed.code(), Code::FailedPrecondition, "{failed:?}");
    assert!(
        failed.message().contains("23505") && failed.message().contains("can now only abort"),
        "{}",
        failed.message()
    );
    assert_eq!(failed.metadata().get("x-sqlstate").unwrap(), "23505");
    assert_eq!(later.code(), Code::FailedPrecondition);
    assert_eq!(outcome(resp.outcome), Outcome::Aborted);
    assert!(
        resp.reason.contains("p2") && resp.reason.contains("duplicate key"),
        "{}",
        resp.reason
    );
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await,
        100,
        "p1's update rolled back"
    );
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_constraint_failing_at_prepare_aborts_everywhere() {
    let sys = System::start(2).await;
    sys.setup_sql(ACCOUNTS).await;
    sys.setup_sql(
        "CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (pid int REFERENCES parent DEFERRABLE INITIALLY DEFERRED);",
    )
    .await;
    let txn = sys.begin().await;
    sys.exec(0, &txn, "UPDATE acct SET bal = 0 WHERE id = 1", vec![])
        .await
        .unwrap();
    // Accepted now; the foreign key is checked only at PREPARE TRANSACTION.
    sys.exec(1, &txn, "INSERT INTO child VALUES (42)", vec![])
        .await
        .unwrap();

    let resp = sys.commit(&txn).await;

    assert_eq!(outcome(resp.outcome), Outcome::Aborted);
    assert!(resp.reason.contains("foreign key"), "{}", resp.reason);
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await,
        100
    );
    assert_eq!(sys.scalar(1, "SELECT count(*) FROM child").await, 0);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_abort_rolls_back_and_later_calls_agree() {
    let sys = System::start(2).await;
    sys.setup_sql(ACCOUNTS).await;
    let txn = sys.begin().await;
    sys.exec(0, &txn, "UPDATE acct SET bal = 0", vec![])
        .await
        .unwrap();
    sys.exec(1, &txn, "UPDATE acct SET bal = 0", vec![])
        .await
        .unwrap();

    let aborted = sys.abort(&txn).await;
    let commit_after = sys.commit(&txn).await;
    // Abort answers before its rollbacks land; once they have, the branch is a tombstone.
    eventually("every rollback is acknowledged", || async {
        sys.get(&txn).await.state == TxnState::Aborted as i32
    })
    .await;
    let exec_after = sys.exec(0, &txn, "SELECT 1", vec![]).await.unwrap_err();

    assert_eq!(outcome(aborted.outcome), Outcome::Aborted);
    assert_eq!(outcome(commit_after.outcome), Outcome::Aborted);
    assert_eq!(
        exec_after.code(),
        Code::FailedPrecondition,
        "{exec_after:?}"
    );
    for db in 0..2 {
        assert_eq!(sys.scalar(db, "SELECT sum(bal)::int8 FROM acct").await, 200);
    }
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_after_commit_is_rejected() {
    let sys = System::start(2).await;
    sys.setup_sql(ACCOUNTS).await;
    let txn = sys.begin().await;
    sys.exec(0, &txn, "UPDATE acct SET bal = 1 WHERE id = 1", vec![])
        .await
        .unwrap();
    assert_eq!(outcome(sys.commit(&txn).await.outcome), Outcome::Committed);

    let on_branch = sys
        .exec(0, &txn, "UPDATE acct SET bal = 2", vec![])
        .await
        .unwrap_err();
    let on_new_participant = sys
        .exec(1, &txn, "UPDATE acct SET bal = 2", vec![])
        .await
        .unwrap_err();

    assert_eq!(on_branch.code(), Code::FailedPrecondition, "{on_branch:?}");
    assert_eq!(
        on_new_participant.code(),
        Code::FailedPrecondition,
        "{on_new_participant:?}"
    );
    assert_eq!(sys.scalar(0, "SELECT sum(bal)::int8 FROM acct").await, 101);
    assert_eq!(sys.scalar(1, "SELECT sum(bal)::int8 FROM acct").await, 200);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_still_active_at_its_deadline_is_aborted() {
    let sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let txn = sys.begin_with(500).await;
    sys.exec(0, &txn, "UPDATE acct SET bal = 0 WHERE id = 1", vec![])
        .await
        .unwrap();

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let t = sys.get(&txn).await;
    let commit = sys.commit(&txn).await;

    assert!(
        matches!(t.state(), TxnState::Aborting | TxnState::Aborted),
        "{t:?}"
    );
    assert!(t.reason.contains("deadline"), "{}", t.reason);
    assert_eq!(outcome(commit.outcome), Outcome::Aborted);
    // The row lock is released: a direct update does not wait.
    let direct = sys.pgs[0].client().await.unwrap();
    direct
        .batch_execute("SET lock_timeout = '2s'; UPDATE acct SET bal = 5 WHERE id = 1")
        .await
        .unwrap();
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_unreachable_in_phase_one_aborts_the_transaction() {
    let sys = System::start(2).await;
    sys.setup_sql(ACCOUNTS).await;
    let txn = sys.begin().await;
    sys.exec(0, &txn, "UPDATE acct SET bal = 0 WHERE id = 1", vec![])
        .await
        .unwrap();
    sys.exec(1, &txn, "UPDATE acct SET bal = 0 WHERE id = 1", vec![])
        .await
        .unwrap();

    sys.participants[1].kill();
    let resp = sys.commit(&txn).await;

    assert_eq!(outcome(resp.outcome), Outcome::Aborted);
    assert!(resp.reason.contains("p2"), "{}", resp.reason);
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await,
        100
    );
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_that_cannot_reach_its_participant_is_left_to_that_participants_resolver() {
    let limits = Limits {
        prepare_timeout: Duration::from_secs(1),
        rollback_retry_for: Duration::from_secs(1),
        ..test_limits()
    };
    let mut sys = System::start_with(2, limits).await;
    sys.setup_sql(ACCOUNTS).await;
    sys.setup_sql(
        "CREATE TABLE parent (id int PRIMARY KEY); INSERT INTO parent VALUES (42);
         CREATE TABLE child (pid int REFERENCES parent DEFERRABLE INITIALLY DEFERRED);",
    )
    .await;
    let txn = sys.begin().await;
    sys.exec(0, &txn, "UPDATE acct SET bal = 0 WHERE id = 1", vec![])
        .await
        .unwrap();
    sys.exec(1, &txn, "INSERT INTO child VALUES (42)", vec![])
        .await
        .unwrap();
    // p2's PREPARE runs the deferred foreign-key check, which waits on this lock past the
    // prepare timeout: a NO, while p1 has prepared.
    let locker = sys.pgs[1].client().await.unwrap();
    locker
        .batch_execute("BEGIN; SELECT FROM parent WHERE id = 42 FOR UPDATE")
        .await
        .unwrap();
    let mut coordinator = sys.coordinator().await;
    let request = proto::CommitRequest {
        txn_id: txn.clone(),
        ..Default::default()
    };
    let committing = tokio::spawn(async move { coordinator.commit(request).await });
    let s = &sys;
    eventually("p1 prepared its branch", || async move {
        s.scalar(0, "SELECT count(*) FROM pg_prepared_xacts").await == 1
    })
    .await;

    sys.participants[0].kill();

    let resp = committing.await.unwrap().unwrap().into_inner();
    assert_eq!(outcome(resp.outcome), Outcome::Aborted, "{}", resp.reason);
    locker.batch_execute("ROLLBACK").await.unwrap();
    let (s, id) = (&sys, txn.as_str());
    eventually("the coordinator gives p1's rollback up", || async move {
        s.get(id).await.state() == TxnState::Aborted
    })
    .await;
    let record = sys.get(&txn).await;
    assert_eq!(record.branches[0].state(), BranchState::Abandoned);
    assert_eq!(
        sys.scalar(0, "SELECT count(*) FROM pg_prepared_xacts")
            .await,
        1,
        "p1's branch is still prepared: nobody could reach it"
    );

    sys.restart_participant(0).await;

    sys.assert_nothing_prepared().await;
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await,
        100
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_ids_get_clear_statuses() {
    let sys = System::start(1).await;
    let mut coord = sys.coordinator().await;
    let unknown = "01a20925-7ca8-7262-8425-e73022c96b09";

    let commit_unknown = coord
        .commit(proto::CommitRequest {
            txn_id: unknown.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let get_unknown = coord
        .get_transaction(proto::GetTransactionRequest {
            txn_id: unknown.into(),
        })
        .await
        .unwrap_err();
    let exec_unknown = sys.exec(0, unknown, "SELECT 1", vec![]).await.unwrap_err();
    let commit_bad = coord
        .commit(proto::CommitRequest {
            txn_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let exec_bad = sys
        .exec(0, "'; DROP TABLE x; --", "SELECT 1", vec![])
        .await
        .unwrap_err();
    let too_long = coord
        .begin(proto::BeginRequest {
            timeout_ms: u32::MAX,
            label: String::new(),
        })
        .await
        .unwrap_err();
    let presumed = coord
        .query_outcome(proto::QueryOutcomeRequest {
            txn_id: unknown.into(),
            coordinator_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(commit_unknown.code(), Code::NotFound);
    assert_eq!(get_unknown.code(), Code::NotFound);
    assert_eq!(exec_unknown.code(), Code::NotFound, "{exec_unknown:?}");
    assert_eq!(commit_bad.code(), Code::InvalidArgument);
    assert!(commit_bad.message().contains("nope"));
    assert_eq!(exec_bad.code(), Code::InvalidArgument);
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert_eq!(
        outcome(presumed.outcome),
        Outcome::Aborted,
        "presumed abort"
    );
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_would_end_the_branch_are_refused() {
    let sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let txn = sys.begin().await;
    sys.exec(0, &txn, "UPDATE acct SET bal = 0 WHERE id = 1", vec![])
        .await
        .unwrap();

    let commit = sys
        .exec(0, &txn, "/* sneaky */ COMMIT", vec![])
        .await
        .unwrap_err();
    let prepare = sys
        .exec(0, &txn, "PREPARE TRANSACTION 'x'", vec![])
        .await
        .unwrap_err();
    let arity = sys
        .exec(0, &txn, "SELECT $1::int", vec![])
        .await
        .unwrap_err();
    let still_fine = sys.exec(0, &txn, "SELECT $1::int", vec![int(1)]).await;
    let aborted = sys.abort(&txn).await;

    assert_eq!(commit.code(), Code::InvalidArgument);
    assert_eq!(prepare.code(), Code::InvalidArgument);
    assert_eq!(arity.code(), Code::InvalidArgument, "{arity:?}");
    assert!(
        still_fine.is_ok(),
        "refusals do not doom the branch: {still_fine:?}"
    );
    assert_eq!(outcome(aborted.outcome), Outcome::Aborted);
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await,
        100
    );
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_stuck_on_a_lock_is_cancelled_when_its_deadline_passes() {
    let sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let blocker = sys.pgs[0].client().await.unwrap();
    blocker
        .batch_execute("BEGIN; UPDATE acct SET bal = 1 WHERE id = 1")
        .await
        .unwrap();
    let txn = sys.begin_with(1000).await;

    // Blocks on the row lock until the deadline abort cancels it (the bound only keeps a
    // broken build from hanging the suite).
    let stuck = tokio::time::timeout(
        Duration::from_secs(60),
        sys.exec(0, &txn, "UPDATE acct SET bal = 2 WHERE id = 1", vec![]),
    )
    .await
    .expect("the stuck statement was never cancelled")
    .unwrap_err();
    let commit = sys.commit(&txn).await;

    assert!(stuck.message().contains("57014"), "cancelled: {stuck:?}");
    assert_eq!(outcome(commit.outcome), Outcome::Aborted);
    blocker.batch_execute("COMMIT").await.unwrap();
    assert_eq!(sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await, 1);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_restarted_mid_transaction_does_not_silently_drop_its_statements() {
    let mut sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let txn = sys.begin().await;
    sys.exec(0, &txn, "UPDATE acct SET bal = 0 WHERE id = 1", vec![])
        .await
        .unwrap();

    sys.participants[0].kill();
    sys.restart_participant(0).await;
    let after_restart = sys
        .exec(0, &txn, "UPDATE acct SET bal = 0 WHERE id = 2", vec![])
        .await
        .unwrap_err();
    let commit = sys.commit(&txn).await;

    assert_eq!(
        after_restart.code(),
        Code::FailedPrecondition,
        "{after_restart:?}"
    );
    assert!(
        after_restart.message().contains("restarted"),
        "{}",
        after_restart.message()
    );
    assert_eq!(outcome(commit.outcome), Outcome::Aborted);
    assert_eq!(sys.scalar(0, "SELECT sum(bal)::int8 FROM acct").await, 200);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_refuses_a_server_without_prepared_transactions() {
    let pg = tokio::task::spawn_blocking(|| {
        support::PgCluster::start_with(support::Settings {
            max_prepared: 0,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let (listener, _) = support::listener().await;
    let config = twopc::participant::Config {
        max_connections: 2,
        ..twopc::participant::Config::new("p1", "http://127.0.0.1:9", pg.conn_str())
    };

    let refused = twopc::participant::run(listener, config, std::future::pending())
        .await
        .unwrap_err()
        .to_string();

    assert!(
        refused.contains("max_prepared_transactions = 0"),
        "{refused}"
    );
    assert!(
        refused.contains("postgresql.conf"),
        "says how to fix it: {refused}"
    );
}

/// A transfer of 100 from account 1 (database 0) to account 2 (the last database), both
/// statements run, not yet committed.
async fn transfer_under_way(sys: &System) -> String {
    sys.setup_sql(ACCOUNTS).await;
    let txn = sys.begin().await;
    let last = sys.pgs.len() - 1;
    let debit = "UPDATE acct SET bal = bal - 100 WHERE id = 1";
    let credit = "UPDATE acct SET bal = bal + 100 WHERE id = 2";
    sys.exec(0, &txn, debit, vec![]).await.unwrap();
    sys.exec(last, &txn, credit, vec![]).await.unwrap();
    txn
}

/// The statement a client sends after its branch was ended behind its back.
async fn one_more_debit(sys: &System, txn: &str) -> tonic::Status {
    let debit = "UPDATE acct SET bal = bal - 1 WHERE id = 1";
    sys.exec(0, txn, debit, vec![]).await.unwrap_err()
}

/// Neither account moved, and nothing is left prepared.
async fn assert_untouched(sys: &System) {
    let last = sys.pgs.len() - 1;
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await,
        100
    );
    assert_eq!(
        sys.scalar(last, "SELECT bal FROM acct WHERE id = 2").await,
        100
    );
    sys.assert_nothing_prepared().await;
}

/// The half transaction of issue 9: a branch rolled back behind the coordinator's back must not
/// be replaced by a fresh one that commits the later statements without the earlier ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_rolled_back_out_of_turn_is_never_reopened() {
    let sys = System::start(1).await;
    let txn = transfer_under_way(&sys).await;

    sys.participant(0)
        .await
        .rollback(proto::BranchRequest {
            txn_id: txn.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let later = one_more_debit(&sys, &txn).await;
    let resp = sys.commit(&txn).await;

    assert_eq!(later.code(), Code::FailedPrecondition, "{later:?}");
    assert!(
        later.message().contains("rolled back"),
        "{}",
        later.message()
    );
    assert_eq!(outcome(resp.outcome), Outcome::Aborted);
    assert_untouched(&sys).await;
}

/// The same through the operator's tool: a branch prepared out of turn and rolled back with
/// `twopcctl resolve --force-abort --participant` stays ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_force_aborted_with_twopcctl_is_never_reopened() {
    let sys = System::start(2).await;
    let txn = transfer_under_way(&sys).await;
    let vote = sys
        .participant(0)
        .await
        .prepare(proto::PrepareRequest {
            txn_id: txn.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let (resolved, said, err) = support::twopcctl(&[
        "resolve",
        &txn,
        "--force-abort",
        "--participant",
        &support::url(sys.participants[0].addr),
        "--operator",
        "test",
    ])
    .await;
    let later = one_more_debit(&sys, &txn).await;
    let resp = sys.commit(&txn).await;

    assert_eq!(vote.vote(), proto::Vote::Yes);
    assert!(resolved && said.contains("rolled back"), "{said}{err}");
    assert_eq!(later.code(), Code::FailedPrecondition, "{later:?}");
    assert_eq!(outcome(resp.outcome), Outcome::Aborted);
    assert_untouched(&sys).await;
}

/// A branch prepared out of turn (here by a direct Participant.Prepare) is not reopened either:
/// the later statement is refused and the transaction can only abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_prepared_out_of_turn_refuses_later_statements_and_aborts() {
    let sys = System::start(2).await;
    let txn = transfer_under_way(&sys).await;
    sys.participant(0)
        .await
        .prepare(proto::PrepareRequest {
            txn_id: txn.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    let later = one_more_debit(&sys, &txn).await;
    let resp = sys.commit(&txn).await;

    assert_eq!(later.code(), Code::FailedPrecondition, "{later:?}");
    assert!(later.message().contains("prepared"), "{}", later.message());
    assert_eq!(outcome(resp.outcome), Outcome::Aborted);
    assert_untouched(&sys).await;
}
