//! The example services (examples/ledger.rs, audit.rs, transfer.rs) as a system: two ledgers and
//! an audit service, each with its own database and an embedded participant, and a transfer
//! client. One global transaction runs through nested gRPC calls (transfer → ledger → audit)
//! that carry it in metadata; it commits in all three databases, or in none when any of them,
//! the innermost included, fails.

use crate::support;

#[allow(dead_code)]
#[path = "../../examples/audit.rs"]
mod audit;
#[allow(dead_code)]
#[path = "../../examples/ledger.rs"]
mod ledger;
#[allow(dead_code)]
#[path = "../../examples/transfer.rs"]
mod transfer;

use serde_json::Value as Json;
use std::net::SocketAddr;
use support::{PgCluster, System, eventually, pg_with, scalar, twopcctl};
use tokio::net::TcpListener;

struct Services {
    sys: System,
    ledger_a: (String, PgCluster),
    ledger_b: (String, PgCluster),
    audit: (String, PgCluster),
    /// Stops the audit service gracefully.
    stop_audit: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn listener() -> (TcpListener, SocketAddr, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr, format!("http://{addr}"))
}

/// A coordinator, and the three services, each on a database of its own; ledger A records its
/// postings with the audit service.
async fn services() -> Services {
    let sys = System::start(0).await;
    let coordinator = sys.url(sys.coordinator.addr);
    let (audit_db, a_db, b_db) = (
        pg_with("SELECT 1").await,
        pg_with("SELECT 1").await,
        pg_with("SELECT 1").await,
    );
    let (l, addr, audit_url) = listener().await;
    let args = audit::Args {
        listen: addr,
        id: "audit".into(),
        coordinator: coordinator.clone(),
        postgres: audit_db.conn_str(),
        resolve_interval_ms: 1_000,
    };
    let (stop_audit, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(audit::run(l, args, async {
        let _ = stopped.await;
    }));
    let mut ledgers = Vec::new();
    for (id, db, audit) in [
        ("ledger-a", &a_db, Some(audit_url.clone())),
        ("ledger-b", &b_db, None),
    ] {
        let (l, addr, url) = listener().await;
        let args = ledger::Args {
            listen: addr,
            id: id.into(),
            coordinator: coordinator.clone(),
            postgres: db.conn_str(),
            audit,
            resolve_interval_ms: 1_000,
        };
        tokio::spawn(ledger::run(l, args, std::future::pending()));
        ledgers.push(url);
    }
    let s = Services {
        sys,
        ledger_a: (ledgers[0].clone(), a_db),
        ledger_b: (ledgers[1].clone(), b_db),
        audit: (audit_url, audit_db),
        stop_audit: Some(stop_audit),
    };
    for url in [&s.ledger_a.0, &s.ledger_b.0] {
        eventually("the ledger serves", || async move {
            ledger_client(url)
                .await
                .balance(ledger::pb::BalanceRequest::default())
                .await
                .is_ok()
        })
        .await;
    }
    s
}

async fn ledger_client(
    url: &str,
) -> ledger::pb::ledger_client::LedgerClient<tonic::transport::Channel> {
    ledger::pb::ledger_client::LedgerClient::new(
        tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect_lazy(),
    )
}

impl Services {
    fn transfer(&self, amount: i64, memo: &str) -> transfer::Args {
        transfer::Args {
            coordinator: self.sys.url(self.sys.coordinator.addr),
            from: self.ledger_a.0.clone(),
            to: self.ledger_b.0.clone(),
            account: "alice".into(),
            amount,
            memo: memo.into(),
        }
    }

    /// Alice's balance in each ledger, and how many postings the audit service holds.
    async fn state(&self) -> (i64, i64, i64) {
        let balance =
            "SELECT coalesce(sum(balance), 0)::int8 FROM balances WHERE account = 'alice'";
        (
            scalar(&self.ledger_a.1, balance).await,
            scalar(&self.ledger_b.1, balance).await,
            scalar(&self.audit.1, "SELECT count(*) FROM records").await,
        )
    }

    async fn nothing_prepared(&self) {
        for db in [&self.ledger_a.1, &self.ledger_b.1, &self.audit.1] {
            assert_eq!(
                scalar(db, "SELECT count(*) FROM pg_prepared_xacts").await,
                0
            );
        }
    }

    /// Alice opens her account in ledger A with 100: a Post outside any global transaction,
    /// which commits on its own (and is audited on its own).
    async fn open_account(&self) {
        ledger_client(&self.ledger_a.0)
            .await
            .post(ledger::pb::PostRequest {
                account: "alice".into(),
                amount: 100,
                memo: "opening".into(),
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_through_nested_services_commits_in_all_three_databases() {
    let s = services().await;
    s.open_account().await;

    let entries = transfer::run(&s.transfer(30, "rent")).await;

    assert!(entries.is_ok(), "{entries:?}");
    assert_eq!(
        s.state().await,
        (70, 30, 2),
        "debited, credited, and the debit audited"
    );
    s.nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_innermost_service_refuses_nothing_commits_anywhere() {
    let s = services().await;
    s.open_account().await;

    // The audit service, called by ledger A inside the transaction, refuses an empty memo.
    let refused = transfer::run(&s.transfer(30, "")).await;

    let error = refused.unwrap_err().to_string();
    assert!(error.contains("needs a memo"), "{error}");
    assert_eq!(
        s.state().await,
        (100, 0, 1),
        "only the opening, which committed on its own"
    );
    s.nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdraft_in_one_ledger_aborts_the_transfer_everywhere() {
    let s = services().await;
    s.open_account().await;

    let overdraft = transfer::run(&s.transfer(500, "too much")).await;

    let error = overdraft.unwrap_err().to_string();
    assert!(error.contains("would go negative"), "{error}");
    assert_eq!(s.state().await, (100, 0, 1));
    s.nothing_prepared().await;
}

/// grpcurl (installed into .venv by `scripts/setup`) with `args`, plaintext.
async fn grpcurl(args: &[&str]) -> serde_json::Value {
    let bin = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/grpcurl");
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("-plaintext").args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{}: {e} (run `bash scripts/setup`)", bin.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcurl {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap()
}

/// As README shows it: a person begins a transaction at the coordinator, joins a ledger's Post
/// to it with `-H 'twopc-txn-id: …'`, and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_post_joined_by_hand_with_grpcurl_commits_with_the_transaction() {
    let s = services().await;
    let coordinator = s.sys.coordinator.addr.to_string();
    let ledger_b = s.ledger_b.0.trim_start_matches("http://").to_string();

    let begun = grpcurl(&["-d", "{}", &coordinator, "twopc.v1.Coordinator/Begin"]).await;
    let txn = begun["txnId"].as_str().unwrap().to_string();
    let header = format!("twopc-txn-id: {txn}");
    let post = r#"{"account": "alice", "amount": 5, "memo": "by hand"}"#;
    grpcurl(&[
        "-H",
        &header,
        "-d",
        post,
        &ledger_b,
        "ledger.v1.Ledger/Post",
    ])
    .await;
    let before = s.state().await;
    let commit = format!(r#"{{"txn_id": "{txn}"}}"#);
    let committed = grpcurl(&["-d", &commit, &coordinator, "twopc.v1.Coordinator/Commit"]).await;

    assert_eq!(before, (0, 0, 0), "nothing visible before the commit");
    assert_eq!(committed["outcome"], "OUTCOME_COMMITTED");
    assert_eq!(s.state().await, (0, 5, 0));
    s.nothing_prepared().await;
}

/// Runs an example client in another language; its exit status and what it printed.
async fn example_client(program: &str, script: &str, args: Vec<String>) -> (bool, String) {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // A path inside the repository (.venv's python), or a program on PATH (node).
    let mut cmd = match root.join(program) {
        inside if inside.exists() => std::process::Command::new(inside),
        _ => std::process::Command::new(program),
    };
    cmd.arg(root.join(script)).args(args).current_dir(&root);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{program}: {e} (run `bash scripts/setup`)"));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

/// examples/python/transfer.py (grpcio) and examples/node/transfer.js (@grpc/grpc-js) do what
/// `transfer` does, from stubs made from the same .proto files: metadata is all it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_and_node_clients_transfer_and_abort_as_the_rust_one_does() {
    let s = services().await;
    s.open_account().await;
    let args = |amount: i64| {
        let t = s.transfer(amount, "from another language");
        vec![
            "--coordinator".into(),
            t.coordinator,
            "--from".into(),
            t.from,
            "--to".into(),
            t.to,
            "--account".into(),
            t.account,
            "--amount".into(),
            amount.to_string(),
        ]
    };

    for (program, script) in [
        (".venv/bin/python", "examples/python/transfer.py"),
        ("node", "examples/node/transfer.js"),
    ] {
        let (ok, printed) = example_client(program, script, args(10)).await;
        assert!(ok && printed.contains("committed"), "{script}: {printed}");
        let (ok, printed) = example_client(program, script, args(1000)).await;
        assert!(
            !ok && printed.contains("would go negative"),
            "{script}: {printed}"
        );
    }

    assert_eq!(
        s.state().await,
        (80, 20, 3),
        "two transfers, each debit audited"
    );
    s.nothing_prepared().await;
}

/// `twopcctl participants --json`, by participant id.
async fn participants(coordinator: &str) -> std::collections::BTreeMap<String, Json> {
    let (ok, out, err) = twopcctl(&["--coordinator", coordinator, "--json", "participants"]).await;
    assert!(ok, "{err}");
    let rows: Vec<Json> = serde_json::from_str(&out).unwrap();
    rows.into_iter()
        .map(|r| (r["participant_id"].as_str().unwrap().to_string(), r))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_lists_every_services_participant_and_sees_one_stop() {
    let mut s = services().await;
    s.open_account().await;
    transfer::run(&s.transfer(30, "rent")).await.unwrap();
    let coordinator = s.sys.url(s.sys.coordinator.addr);

    eventually("all three are seen serving", || {
        let coordinator = coordinator.clone();
        async move {
            let listed = participants(&coordinator).await;
            listed.len() == 3 && listed.values().all(|p| p["health"] == "serving")
        }
    })
    .await;
    let listed = participants(&coordinator).await;
    s.stop_audit.take().unwrap().send(()).unwrap();
    eventually("the stopped audit service is seen unreachable", || {
        let coordinator = coordinator.clone();
        async move { participants(&coordinator).await["audit"]["health"] == "unreachable" }
    })
    .await;
    let (shown, table, _) = twopcctl(&["--coordinator", &coordinator, "participants"]).await;
    println!("{table}");

    for (id, url) in [
        ("ledger-a", &s.ledger_a.0),
        ("ledger-b", &s.ledger_b.0),
        ("audit", &s.audit.0),
    ] {
        let p = &listed[id];
        assert_eq!(p["endpoint"], url.as_str(), "{p}");
        assert_eq!(p["instance_id"].as_str().unwrap().len(), 32, "{p}");
        assert!(p["last_seen_unix_ms"].as_i64().unwrap() > 0, "{p}");
        assert_eq!(
            (p["prepared_branches"].as_u64(), p["open_branches"].as_u64()),
            (Some(0), Some(0))
        );
    }
    assert!(
        shown && table.contains("unreachable") && table.contains("ledger-b"),
        "{table}"
    );
    s.nothing_prepared().await;
}
