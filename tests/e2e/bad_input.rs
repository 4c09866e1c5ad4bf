//! Bad input, tried: every RPC with malformed, oversized and out-of-order requests. Each gets a
//! clear status, and afterwards both servers still serve and a transaction still commits.

use crate::support;

use support::{System, int, outcome, text};
use tonic::Code;
use twopc::proto::{self, Outcome};

const BAD_IDS: [&str; 4] = ["", "not-a-uuid", "01a2\u{0}", "'; DROP TABLE acct; --"];

/// The code a call ended with (OK if it succeeded).
fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
}

/// Whatever was thrown at them, the servers still serve: a transfer commits, nothing is left
/// prepared.
async fn still_serving(sys: &System) {
    let txn = sys.begin().await;
    let debit = "UPDATE acct SET bal = bal - 1 WHERE id = 1";
    sys.exec(0, &txn, debit, vec![]).await.unwrap();
    assert_eq!(outcome(sys.commit(&txn).await.outcome), Outcome::Committed);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_coordinator_requests_get_invalid_argument_or_not_found() {
    let sys = System::start(1).await;
    sys.setup_sql(
        "CREATE TABLE acct (id int PRIMARY KEY, bal bigint); INSERT INTO acct VALUES (1, 100)",
    )
    .await;
    let mut c = sys.coordinator().await;
    let unknown = twopc::proto::TxnId::generate().to_string();
    let live = sys.begin().await;

    let mut codes = Vec::new();
    for id in BAD_IDS
        .iter()
        .map(|s| s.to_string())
        .chain(["x".repeat(1 << 20)])
    {
        codes.push((
            "Commit",
            code(
                c.commit(proto::CommitRequest {
                    txn_id: id.clone(),
                    ..Default::default()
                })
                .await,
            ),
        ));
        let abort = proto::AbortRequest {
            txn_id: id.clone(),
            reason: String::new(),
            ..Default::default()
        };
        codes.push(("Abort", code(c.abort(abort).await)));
        let get = proto::GetTransactionRequest { txn_id: id.clone() };
        codes.push(("GetTransaction", code(c.get_transaction(get).await)));
        let query = proto::QueryOutcomeRequest {
            txn_id: id.clone(),
            coordinator_id: String::new(),
        };
        codes.push(("QueryOutcome", code(c.query_outcome(query).await)));
    }
    let too_long = proto::BeginRequest {
        timeout_ms: u32::MAX,
        label: String::new(),
    };
    let long_label = proto::BeginRequest {
        timeout_ms: 0,
        label: "l".repeat(4096),
    };
    let long_reason = proto::AbortRequest {
        txn_id: live.clone(),
        reason: "r".repeat(4096),
        ..Default::default()
    };
    let no_such_state = proto::ListTransactionsRequest {
        states: vec![999],
        limit: u32::MAX,
    };
    let register =
        |participant_id: &str, endpoint: &str, instance: usize| proto::RegisterBranchRequest {
            txn_id: live.clone(),
            participant_id: participant_id.into(),
            endpoint: endpoint.into(),
            instance_id: "i".repeat(instance),
            one_phase: false,
            ..Default::default()
        };
    let resolve = proto::ResolveTransactionRequest {
        txn_id: live.clone(),
        resolution: 42,
        operator: "me".into(),
        reason: String::new(),
    };

    let begin_too_long = code(c.begin(too_long).await);
    let begin_long_label = code(c.begin(long_label).await);
    let abort_long_reason = code(c.abort(long_reason).await);
    let list_bad_state = code(c.list_transactions(no_such_state).await);
    let ftp = code(c.register_branch(register("p9", "ftp://x", 8)).await);
    let path = code(c.register_branch(register("../..", "http://x", 8)).await);
    let instance = code(c.register_branch(register("p9", "http://x", 1000)).await);
    let resolution = code(c.resolve_transaction(resolve).await);
    let commit_unknown = code(
        c.commit(proto::CommitRequest {
            txn_id: unknown,
            ..Default::default()
        })
        .await,
    );

    for (rpc, got) in codes {
        assert_eq!(got, Code::InvalidArgument, "{rpc} with a malformed id");
    }
    assert_eq!(begin_too_long, Code::InvalidArgument);
    assert_eq!(begin_long_label, Code::InvalidArgument);
    assert_eq!(abort_long_reason, Code::InvalidArgument);
    assert_eq!(list_bad_state, Code::InvalidArgument);
    assert_eq!(ftp, Code::InvalidArgument);
    assert_eq!(path, Code::InvalidArgument);
    assert_eq!(instance, Code::InvalidArgument);
    assert_eq!(resolution, Code::InvalidArgument);
    assert_eq!(commit_unknown, Code::NotFound);
    still_serving(&sys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_participant_requests_get_clear_statuses() {
    let sys = System::start(1).await;
    sys.setup_sql(
        "CREATE TABLE acct (id int PRIMARY KEY, bal bigint); INSERT INTO acct VALUES (1, 100)",
    )
    .await;
    let mut p = sys.participant(0).await;
    let txn = sys.begin().await;
    let execute = |sql: &str, params: Vec<proto::Value>| proto::ExecuteRequest {
        txn_id: txn.clone(),
        sql: sql.into(),
        params,
        ..Default::default()
    };
    let branch = |id: &str| proto::BranchRequest {
        txn_id: id.into(),
        ..Default::default()
    };

    let mut bad_ids = Vec::new();
    for id in BAD_IDS {
        let ex = proto::ExecuteRequest {
            txn_id: id.into(),
            sql: "SELECT 1".into(),
            params: vec![],
            ..Default::default()
        };
        bad_ids.push(code(p.execute(ex).await));
        let prepare = proto::PrepareRequest {
            txn_id: id.into(),
            coordinator_id: String::new(),
        };
        bad_ids.push(code(p.prepare(prepare).await));
        bad_ids.push(code(p.commit(branch(id)).await));
        bad_ids.push(code(p.rollback(branch(id)).await));
    }
    let ten_thousand = (0..10_000).map(int).collect();
    let many_params = code(p.execute(execute("SELECT $1::int", ten_thousand)).await);
    let no_value = vec![proto::Value { kind: None }];
    let empty_param = code(p.execute(execute("SELECT $1::int", no_value)).await);
    let almost_4_mib = vec![text(&"x".repeat((4 << 20) - 1024))];
    let big_param = p
        .execute(execute("SELECT length($1)", almost_4_mib))
        .await
        .map(|r| r.into_inner().rows[0].values[0].kind.clone());
    let over_4_mib = vec![text(&"x".repeat(5 << 20))];
    let too_big = code(p.execute(execute("SELECT length($1)", over_4_mib)).await);
    let commit = sys.commit(&txn).await;

    assert!(
        bad_ids.iter().all(|c| *c == Code::InvalidArgument),
        "{bad_ids:?}"
    );
    assert_eq!(many_params, Code::InvalidArgument);
    assert_eq!(empty_param, Code::InvalidArgument);
    assert_eq!(
        big_param.unwrap(),
        Some(proto::value::Kind::IntValue((4 << 20) - 1024))
    );
    assert_ne!(too_big, Code::Ok, "over gRPC's 4 MiB message limit");
    assert_eq!(
        outcome(commit.outcome),
        Outcome::Committed,
        "refusals before a statement runs leave the branch usable"
    );
    still_serving(&sys).await;
}

/// Out of order and all at once: a storm of Commits and Aborts on one transaction, and a
/// `grpc-timeout` no clock can hold. Every answer agrees on one outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_commits_and_aborts_on_one_transaction_agrees_on_one_outcome() {
    let sys = System::start(1).await;
    sys.setup_sql(
        "CREATE TABLE acct (id int PRIMARY KEY, bal bigint); INSERT INTO acct VALUES (1, 100)",
    )
    .await;
    let txn = sys.begin().await;
    let debit = "UPDATE acct SET bal = bal - 10 WHERE id = 1";
    sys.exec(0, &txn, debit, vec![]).await.unwrap();
    let c = sys.coordinator().await;

    let calls = (0..200).map(|i| {
        let (mut c, txn) = (c.clone(), txn.clone());
        tokio::spawn(async move {
            if i % 2 == 0 {
                let mut req = tonic::Request::new(proto::CommitRequest {
                    txn_id: txn,
                    ..Default::default()
                });
                req.metadata_mut()
                    .insert("grpc-timeout", "99999999999999999H".parse().unwrap());
                c.commit(req).await.map(|r| r.into_inner().outcome)
            } else {
                let abort = proto::AbortRequest {
                    txn_id: txn,
                    reason: "storm".into(),
                    ..Default::default()
                };
                c.abort(abort).await.map(|r| r.into_inner().outcome)
            }
        })
    });
    let mut outcomes = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        outcomes.push(call.await.unwrap());
    }

    let first = outcomes[0].clone().unwrap();
    assert!(
        outcomes.iter().all(|o| o.as_ref().ok() == Some(&first)),
        "{outcomes:?}"
    );
    let balance = sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await;
    match outcome(first) {
        Outcome::Committed => assert_eq!(balance, 90),
        _ => assert_eq!(balance, 100),
    }
    still_serving(&sys).await;
}
