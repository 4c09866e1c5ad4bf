//! Distributed deadlocks: transactions that wait on each other across databases, which no
//! single PostgreSQL can see. The coordinator finds the cycle from its participants' waits and
//! aborts the youngest transaction in it with SQLSTATE 40P01; the others go on and commit.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{System, eventually, outcome, twopcctl};
use tonic::Code;
use twopc::proto::{self, Outcome};

const ACCOUNTS: &str = "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
                        INSERT INTO acct SELECT g, 1000 FROM generate_series(1, 4) g;";

const DEBIT: &str = "UPDATE acct SET bal = bal - 1 WHERE id = 1";

/// Runs `sql` for `txn` on database `db` in the background: it may block on a lock.
fn in_background(
    sys: &Arc<System>,
    db: usize,
    txn: &str,
    sql: &'static str,
) -> tokio::task::JoinHandle<Result<proto::ExecuteResponse, tonic::Status>> {
    let (sys, txn) = (Arc::clone(sys), txn.to_string());
    tokio::spawn(async move { sys.exec(db, &txn, sql, vec![]).await })
}

/// The statement failed as a deadlock victim's does: ABORTED, 40P01, naming the deadlock and
/// the transactions it waited for.
fn assert_victim(result: Result<proto::ExecuteResponse, tonic::Status>, others: &[&str]) {
    let status = result.expect_err("the victim's statement must fail");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("x-sqlstate")
            .unwrap()
            .to_str()
            .unwrap(),
        "40P01"
    );
    assert!(
        status.message().contains("distributed deadlock"),
        "{}",
        status.message()
    );
    for other in others {
        assert!(status.message().contains(other), "{}", status.message());
    }
}

/// Waits for a statement in the background with a bound far above the detector's second and
/// far below the transactions' 30 s deadline: an answer within it is the detector's doing.
async fn answer<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the statement is still blocked: the deadlock was not broken")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_across_two_databases_aborts_the_younger_and_the_older_commits() {
    let sys = Arc::new(System::start(2).await);
    sys.setup_sql(ACCOUNTS).await;
    let (older, younger) = (sys.begin().await, sys.begin().await);
    sys.exec(0, &older, DEBIT, vec![]).await.unwrap();
    sys.exec(1, &younger, DEBIT, vec![]).await.unwrap();

    let started = Instant::now();
    let older_waits = in_background(&sys, 1, &older, DEBIT);
    let younger_waits = in_background(&sys, 0, &younger, DEBIT);

    assert_victim(answer(younger_waits).await, &[&older]);
    let broken_after = started.elapsed();
    answer(older_waits).await.unwrap();
    assert_eq!(
        outcome(sys.commit(&older).await.outcome),
        Outcome::Committed
    );
    let victim = sys.commit(&younger).await;
    assert_eq!(outcome(victim.outcome), Outcome::Aborted);
    assert!(
        victim.reason.contains("distributed deadlock"),
        "{}",
        victim.reason
    );
    for db in [0, 1] {
        assert_eq!(
            sys.scalar(db, "SELECT bal FROM acct WHERE id = 1").await,
            999
        );
    }
    sys.assert_nothing_prepared().await;
    eprintln!("two-database cycle broken {broken_after:?} after it formed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_through_three_databases_is_broken_once() {
    let sys = Arc::new(System::start(3).await);
    sys.setup_sql(ACCOUNTS).await;
    let t: Vec<String> = [sys.begin().await, sys.begin().await, sys.begin().await].into();
    // t[i] holds account 1 in database i, then wants it in database i + 1.
    for (i, txn) in t.iter().enumerate() {
        sys.exec(i, txn, DEBIT, vec![]).await.unwrap();
    }

    let mut waits: Vec<_> = t
        .iter()
        .enumerate()
        .map(|(i, txn)| in_background(&sys, (i + 1) % 3, txn, DEBIT))
        .collect();

    // The youngest is the victim; then each waiter gets its lock once the one it waits for
    // commits: t[1] first (it waited for the victim), then t[0] (it waited for t[1]).
    assert_victim(answer(waits.pop().unwrap()).await, &[&t[0], &t[1]]);
    for i in [1, 0] {
        answer(waits.pop().unwrap()).await.unwrap();
        assert_eq!(outcome(sys.commit(&t[i]).await.outcome), Outcome::Committed);
    }
    assert_eq!(outcome(sys.commit(&t[2]).await.outcome), Outcome::Aborted);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_is_no_cycle_is_shown_and_left_alone() {
    let sys = Arc::new(System::start(2).await);
    sys.setup_sql(ACCOUNTS).await;
    let (holder, waiter) = (sys.begin().await, sys.begin().await);
    sys.exec(0, &holder, DEBIT, vec![]).await.unwrap();
    sys.exec(1, &waiter, DEBIT, vec![]).await.unwrap();
    let waiting = in_background(&sys, 0, &waiter, DEBIT);

    let coordinator = sys.url(sys.coordinator.addr);
    let wait = std::sync::Mutex::new(serde_json::Value::Null);
    eventually("twopcctl locks shows the wait", || async {
        let (ok, out, err) = twopcctl(&["--coordinator", &coordinator, "--json", "locks"]).await;
        assert!(ok, "{err}");
        let graph: serde_json::Value = serde_json::from_str(&out).unwrap();
        *wait.lock().unwrap() = graph["waits"][0].clone();
        !graph["waits"][0].is_null()
    })
    .await;
    let shown = wait.into_inner().unwrap();
    // Several detector passes see this wait; none may take it for a deadlock.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        outcome(sys.commit(&holder).await.outcome),
        Outcome::Committed
    );

    assert_eq!(shown["waiter_txn_id"], waiter.as_str());
    assert_eq!(shown["holder_txn_id"], holder.as_str());
    assert_eq!(shown["participant_id"], "p1");
    answer(waiting).await.unwrap();
    assert_eq!(
        outcome(sys.commit(&waiter).await.outcome),
        Outcome::Committed
    );
    assert_eq!(
        sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await,
        998
    );
    sys.assert_nothing_prepared().await;
}

/// The workload of the issue, as the benchmark runs it (`loadgen crossing`, in its own
/// system): 8 clients moving money both ways between two databases over 4 hot accounts, 120
/// transfers, every deadlock victim retried. Every abort must be a victim's (none waited for
/// its deadline), and the money must be conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_transfers_over_hot_accounts_all_commit_and_conserve_money() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["crossing", "120", "--clients", "8", "--json"])
        .output()
        .await
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("a result line");
    let r: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(r["transfers"], 120, "{r}");
    assert_eq!(r["conserved"], true, "{r}");
    assert_eq!(r["other_aborts"], 0, "only deadlock victims abort: {r}");
    eprintln!("{r}");
}
