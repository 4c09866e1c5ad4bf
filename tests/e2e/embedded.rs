//! A service that owns its database hosts the participant itself (`participant::embedded`): its
//! own statements run in the ambient global transaction's branch on that database, prepared and
//! committed by the coordinator with the other participants' branches; outside a global
//! transaction they commit locally.

use crate::support;

use std::time::Duration;
use support::{PgCluster, System, pg_with, scalar};
use tokio::net::TcpListener;
use twopc::client::{Client, Error, ambient, transact};
use twopc::participant::embedded::Embedded;
use twopc::participant::{self, error::Error as ParticipantError};

const ACCOUNTS: &str = "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
                        INSERT INTO acct VALUES (1, 100);";

const LEDGER: &str = "CREATE TABLE entries (id bigserial PRIMARY KEY, amount bigint NOT NULL);
                      CREATE TABLE balance (bal bigint NOT NULL CHECK (bal >= 0));
                      INSERT INTO balance VALUES (0);";

/// The service's error: the database's, or its own rule.
#[derive(Debug, thiserror::Error)]
enum LedgerError {
    #[error(transparent)]
    Participant(#[from] ParticipantError),
    #[error(transparent)]
    Client(#[from] Error),
    #[error("PostgreSQL: {}", .0.as_db_error().map_or_else(|| .0.to_string(), |e| e.message().to_string()))]
    Db(#[from] tokio_postgres::Error),
}

/// A system with one standalone participant (p1, the bank), and a "ledger" service with its
/// own database and the participant embedded in it, served on its own port.
struct World {
    sys: System,
    client: Client,
    bank: String,
    ledger: Embedded,
    ledger_db: PgCluster,
}

async fn world() -> World {
    let sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let ledger_db = pg_with(LEDGER).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ledger = Embedded::start(participant::Config {
        advertise: Some(format!("http://{addr}")),
        max_connections: 8,
        resolve_interval: Duration::from_secs(2),
        ..participant::Config::new(
            "ledger",
            sys.url(sys.coordinator.addr),
            ledger_db.conn_str(),
        )
    })
    .await
    .unwrap();
    // The service's own server: its own services would sit beside the participant's.
    let service = ledger.service();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(twopc::process::server::incoming(listener))
            .await
    });
    World {
        client: Client::connect(&sys.url(sys.coordinator.addr)).unwrap(),
        bank: sys.url(sys.participants[0].addr),
        sys,
        ledger,
        ledger_db,
    }
}

/// The ledger's own code: records an entry and moves the balance, which may not go negative.
async fn post(ledger: &Embedded, amount: i64) -> Result<i64, LedgerError> {
    ledger
        .transaction(|pg| {
            Box::pin(async move {
                let id: i64 = pg
                    .query_one(
                        "INSERT INTO entries (amount) VALUES ($1) RETURNING id",
                        &[&amount],
                    )
                    .await?
                    .get(0);
                pg.execute("UPDATE balance SET bal = bal + $1", &[&amount])
                    .await?;
                Ok::<_, LedgerError>(id)
            })
        })
        .await
}

impl World {
    async fn ledger_balance(&self) -> i64 {
        scalar(&self.ledger_db, "SELECT bal FROM balance").await
    }

    async fn bank_balance(&self) -> i64 {
        self.sys
            .scalar(0, "SELECT bal FROM acct WHERE id = 1")
            .await
    }

    async fn nothing_prepared(&self) {
        self.sys.assert_nothing_prepared().await;
        let left = scalar(&self.ledger_db, "SELECT count(*) FROM pg_prepared_xacts").await;
        assert_eq!(
            left, 0,
            "the ledger's database still has prepared transactions"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_own_statements_commit_with_the_other_databases() {
    let w = world().await;

    let entry = transact(&w.client, |tx| {
        let w = &w;
        async move {
            tx.execute(&w.bank, "UPDATE acct SET bal = bal - 40 WHERE id = 1", &[])
                .await?;
            post(&w.ledger, 40).await
        }
    })
    .await
    .unwrap();

    assert_eq!(entry, 1);
    assert_eq!((w.bank_balance().await, w.ledger_balance().await), (60, 40));
    w.nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_the_service_breaks_aborts_the_other_databases_too() {
    let w = world().await;

    let result = transact(&w.client, |tx| {
        let w = &w;
        async move {
            tx.execute(&w.bank, "UPDATE acct SET bal = bal + 40 WHERE id = 1", &[])
                .await?;
            post(&w.ledger, -40).await // the balance may not go negative
        }
    })
    .await;

    let error = result.unwrap_err().to_string();
    assert!(error.contains("balance_bal_check"), "{error}");
    assert_eq!((w.bank_balance().await, w.ledger_balance().await), (100, 0));
    w.nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_joined_to_a_callers_transaction_commits_only_with_it() {
    let w = world().await;
    let tx = w.client.begin(None, "a caller elsewhere").await.unwrap();
    tx.execute(&w.bank, "UPDATE acct SET bal = bal - 5 WHERE id = 1", &[])
        .await
        .unwrap();

    // What `JoinLayer` does for a request carrying the caller's `twopc-txn-id`.
    let joined = w.client.join(tx.id(), tx.start().cloned());
    ambient::within(joined.clone(), post(&w.ledger, 5))
        .await
        .unwrap();
    // ... and what its response's `twopc-participants` tells the caller's `PropagateLayer`.
    tx.add_participants(joined.participants());
    let before_commit = w.ledger_balance().await;
    tx.commit().await.unwrap();

    assert_eq!(
        before_commit, 0,
        "nothing visible before the caller commits"
    );
    assert_eq!((w.bank_balance().await, w.ledger_balance().await), (95, 5));
    w.nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_a_global_transaction_the_same_code_commits_locally() {
    let w = world().await;

    post(&w.ledger, 7).await.unwrap();
    let refused = post(&w.ledger, -100).await;

    assert!(refused.is_err());
    assert_eq!(w.ledger_balance().await, 7);
    assert_eq!(
        scalar(&w.ledger_db, "SELECT count(*) FROM entries").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_work_cancelled_halfway_leaves_nothing_for_the_next_user_of_its_connection() {
    let w = world().await;
    let blocker = w.ledger_db.client().await.unwrap();
    blocker
        .batch_execute("BEGIN; LOCK TABLE balance IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    // Its entry is inserted, then it waits on the lock, and its caller gives up.
    let cancelled = tokio::time::timeout(Duration::from_millis(300), post(&w.ledger, 9)).await;
    blocker.batch_execute("ROLLBACK").await.unwrap();
    for _ in 0..3 {
        post(&w.ledger, 1).await.unwrap();
    }

    assert!(cancelled.is_err());
    assert_eq!(
        scalar(&w.ledger_db, "SELECT count(*) FROM entries").await,
        3
    );
    assert_eq!(w.ledger_balance().await, 3);
}
