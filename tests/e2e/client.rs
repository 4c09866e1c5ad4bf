//! The Rust client (`twopc::client`) against a real system: `transact` commits on `Ok`, aborts on
//! `Err` and on panic, nested calls share one transaction, and a transaction dropped unfinished
//! is aborted.

use crate::support;

use std::time::Duration;
use support::{System, eventually};
use twopc::client::{self, Client, Error, Transaction, transact};
use twopc::proto::TxnState;

const ACCOUNTS: &str = "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL, note text);
                        INSERT INTO acct VALUES (1, 100, NULL), (2, 100, NULL);";

struct Bank {
    sys: System,
    client: Client,
    east: String,
    west: String,
}

async fn bank() -> Bank {
    let sys = System::start(2).await;
    sys.setup_sql(ACCOUNTS).await;
    let client = Client::connect(&sys.url(sys.coordinator.addr)).unwrap();
    let (east, west) = (
        sys.url(sys.participants[0].addr),
        sys.url(sys.participants[1].addr),
    );
    Bank {
        sys,
        client,
        east,
        west,
    }
}

impl Bank {
    /// Moves `amount` from account 1 in east to account 1 in west, in `tx`.
    async fn transfer(&self, tx: &Transaction, amount: i64) -> Result<(), Error> {
        let debit = "UPDATE acct SET bal = bal - $1 WHERE id = 1";
        let credit = "UPDATE acct SET bal = bal + $1 WHERE id = 1";
        tx.execute(&self.east, debit, &[&amount]).await?;
        tx.execute(&self.west, credit, &[&amount]).await?;
        Ok(())
    }

    async fn balances(&self) -> (i64, i64) {
        let sql = "SELECT bal FROM acct WHERE id = 1";
        (self.sys.scalar(0, sql).await, self.sys.scalar(1, sql).await)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transact_commits_the_work_and_reads_typed_rows() {
    let b = bank().await;

    let (before, note) = transact(&b.client, |tx| {
        let b = &b;
        async move {
            let rows = tx
                .execute(
                    &b.east,
                    "SELECT bal, note FROM acct WHERE id = $1",
                    &[&1i64],
                )
                .await?;
            let before = rows.get::<i64>(0, "bal")?;
            let note = rows.get::<Option<String>>(0, "note")?;
            b.transfer(&tx, 30).await?;
            Ok::<_, Error>((before, note))
        }
    })
    .await
    .unwrap();

    assert_eq!((before, note), (100, None));
    assert_eq!(b.balances().await, (70, 130));
    b.sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_that_fails_aborts_everywhere_and_its_error_comes_back() {
    let b = bank().await;

    let result: Result<(), Error> = transact(&b.client, |tx| {
        let b = &b;
        async move {
            b.transfer(&tx, 30).await?;
            Err(Error::Invalid("the customer changed their mind".into()))
        }
    })
    .await;

    assert!(
        matches!(&result, Err(Error::Invalid(m)) if m.contains("changed their mind")),
        "{result:?}"
    );
    assert_eq!(b.balances().await, (100, 100));
    b.sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_statement_makes_commit_report_an_abort_with_its_sqlstate() {
    let b = bank().await;
    b.sys
        .setup_sql("ALTER TABLE acct ADD CONSTRAINT not_negative CHECK (bal >= 0)")
        .await;

    let result: Result<(), Error> = transact(&b.client, |tx| {
        let b = &b;
        async move { b.transfer(&tx, 500).await }
    })
    .await;

    let error = result.unwrap_err();
    assert_eq!(error.sqlstate(), Some("23514"), "{error:?}");
    assert_eq!(b.balances().await, (100, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_work_aborts_the_transaction_and_goes_on_unwinding() {
    let b = std::sync::Arc::new(bank().await);

    let task = {
        let b = std::sync::Arc::clone(&b);
        tokio::spawn(async move {
            let _: Result<(), Error> = transact(&b.client.clone(), |tx| {
                let b = std::sync::Arc::clone(&b);
                async move {
                    b.transfer(&tx, 30).await?;
                    panic!("a bug in the middle of a transfer");
                }
            })
            .await;
        })
    };

    assert!(task.await.unwrap_err().is_panic());
    assert_eq!(b.balances().await, (100, 100));
    b.sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_transacts_share_one_transaction_and_only_the_outermost_commits() {
    let b = bank().await;

    let (outer, inner) = transact(&b.client, |tx| {
        let b = &b;
        async move {
            tx.execute(&b.east, "UPDATE acct SET bal = bal - 30 WHERE id = 1", &[])
                .await?;
            // Code that knows nothing of the caller's transaction.
            let inner = transact(&b.client, |inner| async move {
                inner
                    .execute(&b.west, "UPDATE acct SET bal = bal + 30 WHERE id = 1", &[])
                    .await?;
                Ok::<_, Error>(inner.id())
            })
            .await?;
            let state = b.sys.get(&tx.id().to_string()).await.state();
            assert_eq!(
                state,
                TxnState::Active,
                "the inner transact committed nothing"
            );
            Ok::<_, Error>((tx.id(), inner))
        }
    })
    .await
    .unwrap();

    assert_eq!(outer, inner, "one transaction");
    assert_eq!(b.balances().await, (70, 130));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_transact_that_fails_aborts_the_whole_even_if_the_outer_carries_on() {
    let b = bank().await;

    let result = transact(&b.client, |tx| {
        let b = &b;
        async move {
            tx.execute(&b.east, "UPDATE acct SET bal = bal - 30 WHERE id = 1", &[])
                .await?;
            let inner: Result<(), Error> = transact(&b.client, |_| async {
                Err(Error::Invalid("the credit side refused".into()))
            })
            .await;
            assert!(inner.is_err());
            // The outer work ignores the failure and returns Ok: Commit must not succeed.
            Ok::<_, Error>(())
        }
    })
    .await;

    assert!(
        matches!(&result, Err(Error::Aborted { reason, .. }) if reason.contains("credit side refused")),
        "{result:?}"
    );
    assert_eq!(b.balances().await, (100, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_dropped_unfinished_is_aborted_in_the_background() {
    let b = bank().await;
    let tx = b
        .client
        .begin(Some(Duration::from_secs(60)), "dropped")
        .await
        .unwrap();
    let id = tx.id().to_string();
    b.transfer(&tx, 30).await.unwrap();

    drop(tx);

    let (sys, id) = (&b.sys, id.as_str());
    eventually("the dropped transaction is aborted", || async move {
        sys.get(id).await.state() == TxnState::Aborted
    })
    .await;
    assert_eq!(b.balances().await, (100, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_victim_is_run_again_when_the_caller_allows_it() {
    let b = std::sync::Arc::new(bank().await);
    // Each side holds its first row until the other has taken its own: a sure deadlock.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let crossing = |east_first: bool| {
        let (b, barrier) = (std::sync::Arc::clone(&b), std::sync::Arc::clone(&barrier));
        tokio::spawn(async move {
            let runs = std::sync::atomic::AtomicUsize::new(0);
            let options = client::Options {
                deadlock_retries: 3,
                ..Default::default()
            };
            let (first, second) = match east_first {
                true => (b.east.clone(), b.west.clone()),
                false => (b.west.clone(), b.east.clone()),
            };
            client::transact_with(&b.client.clone(), options, |tx| {
                let (first, second, barrier) = (first.clone(), second.clone(), &barrier);
                let run = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    let touch = "UPDATE acct SET bal = bal + 1 WHERE id = 1";
                    tx.execute(&first, touch, &[]).await?;
                    if run == 0 {
                        barrier.wait().await;
                    }
                    tx.execute(&second, touch, &[]).await?;
                    Ok::<_, Error>(())
                }
            })
            .await
            .map(|()| runs.load(std::sync::atomic::Ordering::SeqCst))
        })
    };

    let (a, c) = (crossing(true), crossing(false));
    let runs = [a.await.unwrap().unwrap(), c.await.unwrap().unwrap()];

    assert_eq!(
        runs.iter().sum::<usize>(),
        3,
        "one victim, run once more: {runs:?}"
    );
    assert_eq!(b.balances().await, (102, 102), "both committed once");
    b.sys.assert_nothing_prepared().await;
}
