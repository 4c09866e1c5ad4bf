//! The operator's CLI, `twopcctl`, at 3 a.m.: listing, showing and aborting transactions, and
//! resolving in-doubt ones by hand when a coordinator or a participant is gone.
//!
//! The crashes are real: servers run as their own processes with a failpoint armed
//! (docs/FAILPOINTS.md), so this file needs the `testing` feature.
#![cfg(feature = "testing")]

use crate::support;

use serde_json::Value as Json;
use std::time::Duration;
use support::{
    PgCluster, System, eventually, free_addr, int, outcome, pg_with, scalar, start_coordinator,
    start_participant, twopcctl, url,
};
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
use twopc::proto::{self, Outcome};

const ACCOUNTS: &str = "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
                        INSERT INTO acct VALUES (1, 100), (2, 100);";

async fn prepared(pg: &PgCluster) -> i64 {
    scalar(pg, "SELECT count(*) FROM pg_prepared_xacts").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_and_abort_an_active_transaction() {
    let sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let coordinator = url(sys.coordinator.addr);
    let txn = sys.begin().await;
    sys.exec(0, &txn, "UPDATE acct SET bal = 0 WHERE id = 1", vec![])
        .await
        .unwrap();

    let (listed, table, _) =
        twopcctl(&["--coordinator", &coordinator, "list", "--state", "active"]).await;
    let (_, json, _) = twopcctl(&[
        "--coordinator",
        &coordinator,
        "--json",
        "list",
        "--state",
        "active",
    ])
    .await;
    let (shown, details, _) = twopcctl(&["--coordinator", &coordinator, "show", &txn]).await;
    let (aborted, said, _) = twopcctl(&["--coordinator", &coordinator, "abort", &txn]).await;

    assert!(
        listed && table.contains(&txn) && table.contains("active"),
        "{table}"
    );
    let rows: Json = serde_json::from_str(&json).unwrap();
    assert_eq!(rows[0]["txn_id"], txn.as_str());
    assert_eq!(rows[0]["branches"][0]["participant_id"], "p1");
    assert!(rows[0]["age_ms"].as_i64().unwrap() >= 0);
    assert!(
        shown && details.contains("p1") && details.contains("active"),
        "{details}"
    );
    assert!(aborted && said.contains("aborted"), "{said}");
    assert_eq!(outcome(sys.commit(&txn).await.outcome), Outcome::Aborted);
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await,
        100
    );
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_doubt_branch_whose_coordinator_is_gone_is_listed_and_resolved_by_hand() {
    // The coordinator dies right after its commit decision is durable: the branch stays
    // prepared, holding its row lock, and nobody can ask the coordinator about it.
    let pg = pg_with(ACCOUNTS).await;
    let data_dir = tempfile::tempdir().unwrap();
    let caddr = free_addr();
    let args = vec![
        "--data-dir".to_string(),
        data_dir.path().display().to_string(),
        "--id".into(),
        "ctl".into(),
        // A lone branch would commit in one phase and never be in doubt.
        "--one-phase".into(),
        "false".into(),
    ];
    let mut coordinator = support::process(
        "coordinator",
        caddr,
        &args,
        "coordinator::decision_flushed=abort",
    )
    .await;
    let participant = start_participant("p1", caddr, &pg.conn_str(), None).await;
    let purl = url(participant.addr);
    let mut client = CoordinatorClient::connect(url(caddr)).await.unwrap();
    let txn = client
        .begin(proto::BeginRequest::default())
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    ParticipantClient::connect(purl.clone())
        .await
        .unwrap()
        .execute(proto::ExecuteRequest {
            txn_id: txn.clone(),
            sql: "UPDATE acct SET bal = bal - $1 WHERE id = 1".into(),
            params: vec![int(30)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        client
            .commit(proto::CommitRequest {
                txn_id: txn.clone(),
                ..Default::default()
            })
            .await
            .is_err(),
        "the coordinator died"
    );
    coordinator.wait_exit(support::EXIT_WAIT).await.unwrap();

    let (listed, json, err) = twopcctl(&["--json", "in-doubt", "--participant", &purl]).await;
    let (resolved, said, err2) = twopcctl(&[
        "resolve",
        &txn,
        "--force-commit",
        "--participant",
        &purl,
        "--operator",
        "alice",
    ])
    .await;

    assert!(listed, "{err}");
    let rows: Json = serde_json::from_str(&json).unwrap();
    assert_eq!(rows[0]["txn_id"], txn.as_str());
    assert_eq!(rows[0]["coordinator_id"], "ctl");
    assert!(resolved, "{err2}");
    assert!(said.contains("committed by alice"), "{said}");
    assert_eq!(prepared(&pg).await, 0);
    assert_eq!(scalar(&pg, "SELECT bal FROM acct WHERE id = 1").await, 70);

    // The coordinator comes back and finds the operator agreed with its durable decision.
    let _coordinator = support::process("coordinator", caddr, &args, "").await;
    eventually("the restarted coordinator finishes the transaction", || {
        let txn = txn.clone();
        async move {
            let Ok(mut c) = CoordinatorClient::connect(url(caddr)).await else {
                return false;
            };
            c.get_transaction(proto::GetTransactionRequest { txn_id: txn })
                .await
                .is_ok_and(|t| t.into_inner().state() == proto::TxnState::Committed)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_stuck_committing_on_a_lost_participant_is_resolved_by_hand() {
    // p2 prepares, votes yes, and dies at COMMIT PREPARED: the commit is decided and durable,
    // and the coordinator retries p2 for ever.
    let (pg1, pg2) = (pg_with(ACCOUNTS).await, pg_with(ACCOUNTS).await);
    let data_dir = tempfile::tempdir().unwrap();
    let limits = twopc::coordinator::Limits {
        commit_wait: Duration::from_millis(500),
        ..support::test_limits()
    };
    let coordinator = start_coordinator(data_dir.path(), limits).await;
    let curl = url(coordinator.addr);
    let p1 = start_participant("p1", coordinator.addr, &pg1.conn_str(), None).await;
    let p2addr = free_addr();
    let p2args = vec![
        "--id".to_string(),
        "p2".into(),
        "--coordinator".into(),
        curl.clone(),
        "--postgres".into(),
        pg2.conn_str(),
    ];
    let mut p2 = support::process(
        "participant",
        p2addr,
        &p2args,
        "participant::before_commit_prepared=abort",
    )
    .await;
    let mut client = CoordinatorClient::connect(curl.clone()).await.unwrap();
    let txn = client
        .begin(proto::BeginRequest::default())
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    for addr in [p1.addr, p2addr] {
        ParticipantClient::connect(url(addr))
            .await
            .unwrap()
            .execute(proto::ExecuteRequest {
                txn_id: txn.clone(),
                sql: "UPDATE acct SET bal = bal + 5 WHERE id = 2".into(),
                params: vec![],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let committed = client
        .commit(proto::CommitRequest {
            txn_id: txn.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    p2.wait_exit(support::EXIT_WAIT).await.unwrap();
    assert_eq!(committed.outcome(), Outcome::Committed);
    assert!(committed.branches_pending, "p2 never acknowledged");

    let (_, stuck, _) = twopcctl(&["--coordinator", &curl, "list", "--state", "committing"]).await;
    let (reversed, _, refusal) =
        twopcctl(&["--coordinator", &curl, "resolve", &txn, "--force-abort"]).await;
    let (resolved, json, err) = twopcctl(&[
        "--coordinator",
        &curl,
        "--json",
        "resolve",
        &txn,
        "--force-commit",
        "--operator",
        "bob",
        "--reason",
        "p2 decommissioned",
    ])
    .await;

    assert!(stuck.contains(&txn), "{stuck}");
    assert!(
        !reversed && refusal.contains("FailedPrecondition"),
        "a decision is never reversed: {refusal}"
    );
    assert!(resolved, "{err}");
    let t: Json = serde_json::from_str(&json).unwrap();
    assert_eq!(t["state"], "committed");
    assert_eq!(scalar(&pg1, "SELECT bal FROM acct WHERE id = 2").await, 105);

    // p2 did come back after all: its own resolver asks the coordinator and commits too.
    let _p2 = support::process("participant", p2addr, &p2args, "").await;
    eventually("p2 resolves its in-doubt branch", || async {
        prepared(&pg2).await == 0
    })
    .await;
    assert_eq!(scalar(&pg2, "SELECT bal FROM acct WHERE id = 2").await, 105);
    assert_eq!(prepared(&pg1).await, 0);
}
