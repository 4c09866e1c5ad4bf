//! Bank transfers between two databases under 16 concurrent clients: money is conserved and
//! every transfer is in both databases or in neither.

use crate::support;

use std::collections::HashMap;
use std::sync::Arc;
use support::{System, int, outcome, text};
use twopc::proto::Outcome;

const CLIENTS: usize = 16;
const TRANSFERS_PER_CLIENT: usize = 12;
const ACCOUNTS: i64 = 10;

/// One transfer: debit `amount` from an account in database `from`, credit it in the other,
/// and write a ledger row carrying the txn id into each. Returns the txn id and the outcome
/// Commit reported (None if a statement failed and we aborted).
async fn transfer(sys: &System, from: usize, acct: i64, amount: i64) -> (String, Outcome) {
    let to = 1 - from;
    let txn = sys.begin().await;
    let steps = async {
        // Two transfers can lock rows in opposite orders across databases, a deadlock neither
        // server can see: the coordinator's detector breaks it, and the victim aborts.
        sys.exec(
            from,
            &txn,
            "UPDATE acct SET bal = bal - $1 WHERE id = $2",
            vec![int(amount), int(acct)],
        )
        .await?;
        sys.exec(
            to,
            &txn,
            "UPDATE acct SET bal = bal + $1 WHERE id = $2",
            vec![int(amount), int(acct)],
        )
        .await?;
        for (db, delta) in [(from, -amount), (to, amount)] {
            sys.exec(
                db,
                &txn,
                "INSERT INTO ledger VALUES ($1, $2)",
                vec![text(&txn), int(delta)],
            )
            .await?;
        }
        Ok::<_, tonic::Status>(())
    }
    .await;
    let result = match steps {
        Ok(()) => outcome(sys.commit(&txn).await.outcome),
        Err(_) => outcome(sys.abort(&txn).await.outcome),
    };
    (txn, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_keep_the_total_and_are_all_or_nothing() {
    let sys = Arc::new(System::start(2).await);
    sys.setup_sql(&format!(
        "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
         INSERT INTO acct SELECT g, 1000 FROM generate_series(1, {ACCOUNTS}) g;
         CREATE TABLE ledger (txn_id text NOT NULL, delta bigint NOT NULL);"
    ))
    .await;
    let total_before = sys.scalar(0, "SELECT sum(bal)::int8 FROM acct").await
        + sys.scalar(1, "SELECT sum(bal)::int8 FROM acct").await;

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let sys = Arc::clone(&sys);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for i in 0..TRANSFERS_PER_CLIENT {
                    let acct = ((c * 7 + i * 3) as i64 % ACCOUNTS) + 1;
                    seen.push(transfer(&sys, (c + i) % 2, acct, (i as i64 % 5) + 1).await);
                }
                seen
            })
        })
        .collect();
    let mut outcomes: HashMap<String, Outcome> = HashMap::new();
    for c in clients {
        outcomes.extend(c.await.unwrap());
    }

    let total_after = sys.scalar(0, "SELECT sum(bal)::int8 FROM acct").await
        + sys.scalar(1, "SELECT sum(bal)::int8 FROM acct").await;
    assert_eq!(total_after, total_before, "money is conserved");
    let committed = outcomes
        .values()
        .filter(|o| **o == Outcome::Committed)
        .count();
    assert!(
        committed > CLIENTS * TRANSFERS_PER_CLIENT / 2,
        "most transfers commit: {committed}"
    );
    for db in 0..2 {
        let client = sys.pgs[db].client().await.unwrap();
        let rows = client
            .query("SELECT txn_id FROM ledger", &[])
            .await
            .unwrap();
        let in_db: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        for (txn, o) in &outcomes {
            assert_eq!(
                in_db.contains(txn),
                *o == Outcome::Committed,
                "txn {txn} ({o:?}) in database {db}: its ledger row must be there exactly when it committed"
            );
        }
    }
    sys.assert_nothing_prepared().await;
}
