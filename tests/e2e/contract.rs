//! The cheaper contract (docs/PROTOCOL.md §12), as clients use it: a transaction the client
//! starts itself (its own UUIDv7 id and the coordinator's epoch, no Begin), several
//! statements in one Execute, Commit naming the participants it sent statements to, and
//! Commit answering at the durable decision. And the half-commit it closes: a Commit after an
//! Execute that failed because its participant could not reach the coordinator.

use crate::support;

use support::{
    PgCluster, System, eventually, free_addr, int, outcome, pg_with, scalar, start_participant, url,
};
use tonic::Code;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
use twopc::proto::{self, CommitWait, Outcome, TxnId, TxnState};

const ACCOUNTS: &str = "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
                        INSERT INTO acct VALUES (1, 1000), (2, 1000);";

fn statement(sql: &str, params: Vec<proto::Value>) -> proto::Statement {
    proto::Statement {
        sql: sql.into(),
        params,
    }
}

/// An Execute of a transaction whose id the client chose, in `epoch`.
fn started(txn: &str, epoch: u64, statements: Vec<proto::Statement>) -> proto::ExecuteRequest {
    proto::ExecuteRequest {
        txn_id: txn.into(),
        epoch,
        timeout_ms: 20_000,
        label: "three calls".into(),
        statements,
        ..Default::default()
    }
}

fn commit_naming(txn: &str, names: &[&str], wait: CommitWait) -> proto::CommitRequest {
    proto::CommitRequest {
        txn_id: txn.into(),
        participants: Some(proto::Participants {
            names: names.iter().map(|n| n.to_string()).collect(),
        }),
        wait: wait as i32,
    }
}

async fn epoch_of(sys: &System) -> u64 {
    let mut coordinator = sys.coordinator().await;
    let epoch = coordinator.get_epoch(proto::GetEpochRequest {}).await;
    epoch.unwrap().into_inner().epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_in_three_calls_commits_on_both_databases() {
    let sys = System::start(2).await;
    sys.setup_sql(ACCOUNTS).await;
    let epoch = epoch_of(&sys).await;
    let txn = TxnId::generate().to_string();

    // Two statements in one call on p1, one on p2, and Commit: no Begin, no RegisterBranch.
    let (mut p1, mut p2) = (sys.participant(0).await, sys.participant(1).await);
    let debit = p1.execute(started(
        &txn,
        epoch,
        vec![
            statement("UPDATE acct SET bal = bal - $1 WHERE id = 1", vec![int(30)]),
            statement("SELECT bal FROM acct WHERE id = 1", vec![]),
        ],
    ));
    let debit = debit.await.unwrap().into_inner();
    let credit = p2.execute(started(
        &txn,
        epoch,
        vec![statement(
            "UPDATE acct SET bal = bal + $1 WHERE id = 1",
            vec![int(30)],
        )],
    ));
    let credit = credit.await.unwrap().into_inner();
    let names = [
        debit.participant_id.as_str(),
        credit.participant_id.as_str(),
    ];
    let committed = sys
        .coordinator()
        .await
        .commit(commit_naming(&txn, &names, CommitWait::Decided))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(names, ["p1", "p2"]);
    assert_eq!(debit.results.len(), 2, "a result per statement");
    assert_eq!(debit.results[0].rows_affected, 1);
    assert_eq!(
        debit.results[1].rows[0].values[0],
        int(970),
        "its own write"
    );
    assert_eq!(outcome(committed.outcome), Outcome::Committed);
    eventually("phase 2 lands after the answer", || async {
        sys.get(&txn).await.state == TxnState::Committed as i32
    })
    .await;
    let shown = sys.get(&txn).await;
    assert_eq!(shown.label, "three calls", "the first enlistment's label");
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await,
        970
    );
    assert_eq!(
        sys.scalar(1, "SELECT bal FROM acct WHERE id = 1").await,
        1030
    );
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_after_an_execute_that_could_not_enlist_aborts_instead_of_committing_half() {
    // p1 reaches the coordinator; p2 is configured with one that is not there, as during a
    // failover, so its Execute fails before its branch exists anywhere to doom.
    let sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let pg2: PgCluster = pg_with(ACCOUNTS).await;
    let p2 = start_participant("p2", free_addr(), &pg2.conn_str(), None).await;
    let mut to_p2 = ParticipantClient::connect(url(p2.addr)).await.unwrap();
    let epoch = epoch_of(&sys).await;

    // As a hand-written client would: debit on p1, credit on p2 fails, Commit anyway,
    // naming every participant it sent a statement to.
    let half = TxnId::generate().to_string();
    let mut p1 = sys.participant(0).await;
    let debit = p1.execute(started(
        &half,
        epoch,
        vec![statement(
            "UPDATE acct SET bal = bal - 1 WHERE id = 1",
            vec![],
        )],
    ));
    debit.await.unwrap();
    let credit = to_p2
        .execute(started(
            &half,
            epoch,
            vec![statement(
                "UPDATE acct SET bal = bal + 1 WHERE id = 1",
                vec![],
            )],
        ))
        .await
        .unwrap_err();
    let named_p2 = credit.metadata().get("twopc-participant-id").unwrap();
    let commit = sys
        .coordinator()
        .await
        .commit(commit_naming(
            &half,
            &["p1", named_p2.to_str().unwrap()],
            CommitWait::Applied,
        ))
        .await
        .unwrap()
        .into_inner();

    // The same through the Rust client, whose work swallows the failed credit.
    let client = twopc::client::Client::connect(&url(sys.coordinator.addr)).unwrap();
    let (p1_url, p2_url) = (url(sys.participants[0].addr), url(p2.addr));
    let sdk = twopc::client::transact(&client, |tx| {
        let (p1_url, p2_url) = (p1_url.clone(), p2_url.clone());
        async move {
            tx.execute(&p1_url, "UPDATE acct SET bal = bal - 1 WHERE id = 2", &[])
                .await?;
            let _ignored = tx
                .execute(&p2_url, "UPDATE acct SET bal = bal + 1 WHERE id = 2", &[])
                .await;
            Ok::<_, twopc::client::Error>(())
        }
    })
    .await;

    assert_eq!(credit.code(), Code::Unavailable, "{credit:?}");
    assert_eq!(outcome(commit.outcome), Outcome::Aborted);
    assert!(
        commit
            .reason
            .contains("sent statements to p2, which never enlisted"),
        "{}",
        commit.reason
    );
    assert!(
        matches!(&sdk, Err(twopc::client::Error::Aborted { reason, .. }) if reason.contains("p2")),
        "{sdk:?}"
    );
    let sum = "SELECT sum(bal)::bigint FROM acct";
    let total = scalar(&sys.pgs[0], sum).await + scalar(&pg2, sum).await;
    assert_eq!(total, 4000, "money is conserved");
    sys.assert_nothing_prepared().await;
    assert_eq!(
        scalar(&pg2, "SELECT count(*) FROM pg_prepared_xacts").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_forgotten_in_a_restart_cannot_be_continued_in_the_new_epoch() {
    let (pg1, pg2) = (pg_with(ACCOUNTS).await, pg_with(ACCOUNTS).await);
    let data_dir = tempfile::tempdir().unwrap();
    let caddr = free_addr();
    let args = vec![
        "--data-dir".to_string(),
        data_dir.path().display().to_string(),
        "--id".into(),
        "epochs".into(),
    ];
    let coordinator = support::process("coordinator", caddr, &args, "").await;
    let p1 = start_participant("p1", caddr, &pg1.conn_str(), None).await;
    let p2 = start_participant("p2", caddr, &pg2.conn_str(), None).await;
    let coordinator_client = || async { CoordinatorClient::connect(url(caddr)).await.unwrap() };
    let epoch = |mut c: CoordinatorClient<tonic::transport::Channel>| async move {
        let e = c.get_epoch(proto::GetEpochRequest {}).await.unwrap();
        e.into_inner().epoch
    };
    let before = epoch(coordinator_client().await).await;
    let txn = TxnId::generate().to_string();
    let debit = vec![statement(
        "UPDATE acct SET bal = bal - 5 WHERE id = 1",
        vec![],
    )];
    let mut to_p1 = ParticipantClient::connect(url(p1.addr)).await.unwrap();
    to_p1.execute(started(&txn, before, debit)).await.unwrap();

    // The coordinator dies right after, its Active hint perhaps never on disk, and comes back.
    coordinator.signal("KILL").unwrap();
    drop(coordinator);
    let _coordinator = support::process("coordinator", caddr, &args, "").await;
    let after = epoch(coordinator_client().await).await;
    let credit = vec![statement(
        "UPDATE acct SET bal = bal + 5 WHERE id = 1",
        vec![],
    )];
    let mut to_p2 = ParticipantClient::connect(url(p2.addr)).await.unwrap();
    let continued = to_p2.execute(started(&txn, before, credit.clone())).await;
    // A transaction never seen, started in the old epoch: refused with the new one.
    let fresh = TxnId::generate().to_string();
    let stale = to_p2.execute(started(&fresh, before, credit)).await;
    let commit = coordinator_client()
        .await
        .commit(commit_naming(&txn, &["p1", "p2"], CommitWait::Applied))
        .await
        .unwrap()
        .into_inner();

    assert!(
        after > before,
        "{after} > {before}: every start is a new epoch"
    );
    let continued = continued.unwrap_err();
    assert_eq!(continued.code(), Code::FailedPrecondition, "{continued:?}");
    let stale = stale.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("stale epoch"), "{stale:?}");
    assert_eq!(
        stale
            .metadata()
            .get("twopc-epoch")
            .unwrap()
            .to_str()
            .unwrap(),
        after.to_string(),
        "the epoch to start again in"
    );
    assert_eq!(
        outcome(commit.outcome),
        Outcome::Aborted,
        "{}",
        commit.reason
    );
    eventually("p1's forgotten branch is rolled back", || async {
        scalar(&pg1, "SELECT bal FROM acct WHERE id = 1").await == 1000
            && scalar(
                &pg1,
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'",
            )
            .await
                == 0
    })
    .await;
    assert_eq!(
        scalar(&pg2, "SELECT bal FROM acct WHERE id = 1").await,
        1000
    );
    for pg in [&pg1, &pg2] {
        assert_eq!(
            scalar(pg, "SELECT count(*) FROM pg_prepared_xacts").await,
            0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_statement_stops_its_batch_and_dooms_the_branch() {
    let sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let epoch = epoch_of(&sys).await;
    let txn = TxnId::generate().to_string();

    let failed = sys
        .participant(0)
        .await
        .execute(started(
            &txn,
            epoch,
            vec![
                statement("UPDATE acct SET bal = 0 WHERE id = 1", vec![]),
                statement("INSERT INTO acct VALUES (2, 0)", vec![]),
                statement("UPDATE acct SET bal = 0 WHERE id = 2", vec![]),
            ],
        ))
        .await
        .unwrap_err();
    let commit = sys
        .coordinator()
        .await
        .commit(commit_naming(&txn, &["p1"], CommitWait::Applied))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(
        failed.code(),
        Code::FailedPrecondition,
        "a unique violation"
    );
    assert!(failed.message().contains("statement 2 of 3"), "{failed:?}");
    assert_eq!(outcome(commit.outcome), Outcome::Aborted);
    assert_eq!(
        sys.scalar(0, "SELECT sum(bal)::bigint FROM acct").await,
        2000
    );
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_client_that_chooses_its_ids_gets_wrong_is_refused_clearly() {
    let sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let epoch = epoch_of(&sys).await;
    let select = || vec![statement("SELECT 1", vec![])];
    let mut p1 = sys.participant(0).await;

    let v4 = uuid::Uuid::new_v4().to_string();
    let not_v7 = p1.execute(started(&v4, epoch, select())).await.unwrap_err();
    let unknown_without_epoch = p1
        .execute(started(&TxnId::generate().to_string(), 0, select()))
        .await
        .unwrap_err();
    let mut both = started(&TxnId::generate().to_string(), epoch, select());
    both.sql = "SELECT 2".into();
    let both = p1.execute(both).await.unwrap_err();
    // Aborted before any statement: no statement still on its way can create it afterwards.
    let early = TxnId::generate().to_string();
    let mut coordinator = sys.coordinator().await;
    let abort = coordinator.abort(proto::AbortRequest {
        txn_id: early.clone(),
        reason: "changed my mind".into(),
        epoch,
    });
    let abort = abort.await.unwrap().into_inner();
    let late = p1
        .execute(started(&early, epoch, select()))
        .await
        .unwrap_err();
    let nothing = TxnId::generate().to_string();
    let empty_commit = sys
        .coordinator()
        .await
        .commit(commit_naming(&nothing, &[], CommitWait::Applied))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(not_v7.code(), Code::InvalidArgument, "{not_v7:?}");
    assert!(not_v7.message().contains("UUIDv7"), "{not_v7:?}");
    assert_eq!(unknown_without_epoch.code(), Code::NotFound, "as before");
    assert_eq!(both.code(), Code::InvalidArgument, "{both:?}");
    assert_eq!(outcome(abort.outcome), Outcome::Aborted);
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert_eq!(
        outcome(empty_commit.outcome),
        Outcome::Committed,
        "nothing ran"
    );
    sys.assert_nothing_prepared().await;
}
