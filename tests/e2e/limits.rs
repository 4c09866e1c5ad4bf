//! Limits: what clients can use up, what they are told when they have, and what they can never
//! take from the protocol.

use crate::support;

use support::{System, outcome, pg_with};
use tonic::Code;
use twopc::participant::database::Database;
use twopc::participant::gid::Gid;
use twopc::participant::postgres::Postgres;
use twopc::participant::statement::Limits;
use twopc::proto::Outcome;
use twopc::proto::TxnId;

/// Branches holding every branch connection get RESOURCE_EXHAUSTED naming the limit, and
/// never hold up phase 2: COMMIT PREPARED runs on the protocol's own connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_holding_every_connection_never_hold_up_phase_two() {
    let pg = pg_with("CREATE TABLE t (x int)").await;
    let db = Postgres::new(&pg.conn_str(), 2).unwrap();
    let gid = Gid::new("limits", TxnId::generate()).unwrap();
    // One branch prepared, its connection back in the pool; then two idle branches hold both.
    let prepared = db.conn().await.unwrap();
    let prepare = format!(
        "BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION {}",
        gid.literal()
    );
    prepared.batch_execute(&prepare).await.unwrap();
    drop(prepared);
    let _idle = [db.conn().await.unwrap(), db.conn().await.unwrap()];

    let third = db.conn().await.map(|_| ()).unwrap_err();
    let committed = db.finish_prepared(&gid, 0, true).await;

    let status = tonic::Status::from(third);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("all 2 branch connections")
            && status.message().contains("--max-connections"),
        "names the limit: {}",
        status.message()
    );
    assert!(committed.is_ok(), "{committed:?}");
    assert_eq!(support::scalar(&pg, "SELECT count(*) FROM t").await, 1);
}

/// A result over the limit fails its statement, whole: never truncated, and the transaction can
/// only abort. SQL over its limit is refused before it runs, and the branch carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_or_sql_over_its_limit_fails_with_the_limit_named() {
    let sys = System::start(1).await;
    let txn = sys.begin().await;
    let huge_sql = format!("SELECT 1 -- {}", "x".repeat(2 << 20));

    let long_sql = sys.exec(0, &txn, &huge_sql, vec![]).await.unwrap_err();
    let still_usable = sys.exec(0, &txn, "SELECT 1", vec![]).await;
    let big = sys
        .exec(
            0,
            &txn,
            "SELECT repeat('x', 1000000) FROM generate_series(1, 5)",
            vec![],
        )
        .await
        .unwrap_err();
    let commit = sys.commit(&txn).await;

    assert_eq!(long_sql.code(), Code::InvalidArgument, "{long_sql:?}");
    assert!(
        long_sql.message().contains("1048576"),
        "{}",
        long_sql.message()
    );
    assert!(still_usable.is_ok(), "{still_usable:?}");
    assert_eq!(big.code(), Code::ResourceExhausted, "{big:?}");
    assert!(
        big.message().contains("4194304 bytes") && big.message().contains("can now only abort"),
        "{}",
        big.message()
    );
    assert_eq!(outcome(commit.outcome), Outcome::Aborted);
    sys.assert_nothing_prepared().await;
}

/// Each Execute limit is the participant's setting, and its message names the flag: a request
/// over one is refused before a branch opens, a result over one fails whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_execute_limits_are_the_participants_settings() {
    let pg = pg_with("CREATE TABLE t (x int)").await;
    let db = Postgres::new(&pg.conn_str(), 4)
        .unwrap()
        .with_limits(Limits {
            sql_bytes: 100,
            params: 2,
            result_rows: 3,
            result_bytes: 1000,
        });
    let run = |sql: &'static str| {
        let db = &db;
        async move {
            let conn = db.conn().await.unwrap();
            db.execute(&conn, sql, &[], true)
                .await
                .map(|r| r.rows.len())
                .map_err(|e| e.to_string())
        }
    };

    let within = run("SELECT g FROM generate_series(1, 3) g").await;
    let rows = run("SELECT g FROM generate_series(1, 4) g").await;
    let bytes = run("SELECT repeat('x', 2000)").await;
    let long_sql = db.limits().check_request(&" ".repeat(101), 0);
    let params = db.limits().check_request("SELECT $1::int + $2 + $3", 3);

    assert_eq!(within, Ok(3));
    for (result, flag) in [
        (
            long_sql.map(|()| 0).map_err(|e| e.to_string()),
            "--max-sql-bytes",
        ),
        (
            params.map(|()| 0).map_err(|e| e.to_string()),
            "--max-params",
        ),
        (rows, "--max-result-rows"),
        (bytes, "--max-result-bytes"),
    ] {
        let message = result.unwrap_err();
        assert!(message.contains(flag), "{flag}: {message}");
    }
}
