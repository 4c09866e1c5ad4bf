//! Bank transfers between two databases under 16 concurrent clients: money is conserved and
//! every transfer is in both databases or in neither. The model of a scenario: the system from
//! the test kit's builder, the money moved and checked by `testkit::bank`.

use crate::support;

use std::sync::Arc;
use support::System;
use support::bank::{self, Seen};

const CLIENTS: usize = 16;
const TRANSFERS_PER_CLIENT: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_keep_the_total_and_are_all_or_nothing() {
    let sys = System::builder()
        .databases(2)
        .schema(bank::SCHEMA)
        .start()
        .await
        .unwrap();
    let sys = Arc::new(sys);

    // Two transfers can lock rows in opposite orders across databases, a deadlock neither
    // server can see: the coordinator's detector breaks it, and the victim aborts.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let sys = Arc::clone(&sys);
            tokio::spawn(async move {
                let mut transfers = Vec::new();
                for i in 0..TRANSFERS_PER_CLIENT {
                    let acct = ((c * 7 + i * 3) as i64 % 10) + 1;
                    let from = (c + i) % 2;
                    let amount = (i as i64 % 5) + 1;
                    let to = (1 - from, acct);
                    transfers.push(bank::transfer(&sys, (from, acct), to, amount).await);
                }
                transfers
            })
        })
        .collect();
    let mut transfers = Vec::new();
    for c in clients {
        transfers.extend(c.await.unwrap());
    }

    let violations = bank::check(&sys, &transfers).await;
    assert!(violations.is_empty(), "{violations:#?}");
    let committed = transfers
        .iter()
        .filter(|t| t.seen == Seen::Committed)
        .count();
    assert!(
        committed > CLIENTS * TRANSFERS_PER_CLIENT / 2,
        "most transfers commit: {committed}"
    );
}

/// The scenario docs/ARCHITECTURE.md shows: the builder and the bank are all a scenario needs.
#[tokio::test]
async fn a_transfer_commits_in_both_databases() {
    let sys = System::builder()
        .databases(2)
        .schema(bank::SCHEMA)
        .start()
        .await
        .unwrap();
    let moved = bank::transfer(&sys, (0, 1), (1, 1), 10).await;
    assert_eq!(moved.seen, bank::Seen::Committed);
    assert!(bank::check(&sys, &[moved]).await.is_empty());
}
