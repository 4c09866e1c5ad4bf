//! Waiting for recovery to settle, and the invariants checked after it.
//!
//! Settled: no prepared transaction in any database, and the coordinator lists no transaction
//! as active, preparing, committing or aborting (so "nothing is left hanging" holds). Then the
//! bank's invariants over the whole history so far (`twopc::testkit::bank`: money, atomicity,
//! durability, the coordinator's agreement), read from the workload's tables.

use crate::system::{Deployment, System};
use crate::workload::{Clients, bounded, request};
use futures::StreamExt;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use twopc::proto::{self, TxnState};
pub use twopc::testkit::bank::Violation;
use twopc::testkit::bank::{self, ACCOUNTS, INITIAL_BALANCE, Tables, Told, Transfer};

/// With `--embedded`: the ledger service's own tables (examples/ledger.rs); an entry's memo is
/// the txn id, except the opening balances'.
const EMBEDDED_TABLES: Tables = Tables {
    balance: "SELECT coalesce(sum(balance), 0)::int8 FROM balances",
    ledger: "SELECT memo, count(*)::int8, sum(amount)::int8 FROM entries \
             WHERE memo <> 'opening' GROUP BY memo",
};

const IN_FLIGHT: [TxnState; 4] = [
    TxnState::Active,
    TxnState::Preparing,
    TxnState::Committing,
    TxnState::Aborting,
];

/// Everything that is not settled yet, one line each; empty when settled.
async fn unsettled(sys: &System, clients: &Clients) -> Vec<String> {
    let mut left = Vec::new();
    for (i, pg) in sys.pgs.iter().enumerate() {
        let rows = async {
            let client = pg.client().await?;
            let rows = client
                .query(
                    "SELECT gid, (now() - prepared)::text FROM pg_prepared_xacts ORDER BY prepared",
                    &[],
                )
                .await?;
            Ok::<_, anyhow::Error>(rows)
        };
        match tokio::time::timeout(Duration::from_secs(10), rows).await {
            Ok(Ok(rows)) => {
                for r in rows {
                    left.push(format!(
                        "db{}: prepared {} (for {})",
                        i + 1,
                        r.get::<_, String>(0),
                        r.get::<_, String>(1)
                    ));
                }
            }
            Ok(Err(e)) => left.push(format!(
                "db{}: cannot query pg_prepared_xacts: {e:#}",
                i + 1
            )),
            Err(_) => left.push(format!("db{}: pg_prepared_xacts query timed out", i + 1)),
        }
    }
    let listed = bounded(clients.coordinator.clone().list_transactions(request(
        proto::ListTransactionsRequest {
            states: IN_FLIGHT.iter().map(|s| *s as i32).collect(),
            limit: 1000,
        },
    )))
    .await;
    match listed {
        Ok(list) => {
            for t in list.transactions {
                let branches: Vec<String> = t
                    .branches
                    .iter()
                    .map(|b| format!("{}:{:?}", b.participant_id, b.state()))
                    .collect();
                left.push(format!(
                    "coordinator: {} is {:?} (branches {})",
                    t.txn_id,
                    t.state(),
                    branches.join(", ")
                ));
            }
        }
        Err(s) => left.push(format!(
            "coordinator: ListTransactions failed: {:?}: {}",
            s.code(),
            s.message()
        )),
    }
    left
}

/// Waits until settled, at most `limit`. Ok(how long it took), or Err(what is left).
pub async fn settle(
    sys: &System,
    clients: &Clients,
    limit: Duration,
) -> Result<Duration, Vec<String>> {
    let start = Instant::now();
    loop {
        let left = unsettled(sys, clients).await;
        if left.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= limit {
            return Err(left);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get_transaction(clients: &Clients, id: &str) -> Told {
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let r = bounded(
            clients
                .coordinator
                .clone()
                .get_transaction(request(proto::GetTransactionRequest { txn_id: id.into() })),
        )
        .await;
        match r {
            Ok(t) => return Told::of(&t),
            Err(s) if s.code() == tonic::Code::NotFound => return Told::NotFound,
            Err(s) => last = format!("{:?}: {}", s.code(), s.message()),
        }
    }
    Told::Error(last)
}

/// Checks every invariant over the whole history (`testkit::bank`'s, with the workload's
/// tables). Call it settled, with the workload stopped.
pub async fn check(sys: &System, clients: &Clients, txns: &[Transfer]) -> Vec<Violation> {
    let tables = match sys.deployment {
        Deployment::Standalone => Tables::STANDARD,
        Deployment::Embedded => EMBEDDED_TABLES,
    };
    let dbs = match bank::read_all(&sys.pgs, tables).await {
        Ok(dbs) => dbs,
        Err(v) => return vec![v],
    };
    let told: HashMap<String, Told> = futures::stream::iter(txns)
        .map(|t| async move { (t.id.clone(), get_transaction(clients, &t.id).await) })
        .buffer_unordered(16)
        .collect()
        .await;
    bank::check_states(&dbs, ACCOUNTS * INITIAL_BALANCE, txns, &told)
}
