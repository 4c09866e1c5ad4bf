//! A person at a shell with grpcurl: the real grpcurl binary (installed into .venv by
//! `scripts/setup`) against running servers, with no .proto file, as README shows it.

use crate::support;

use serde_json::Value as Json;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use support::System;

fn grpcurl_path() -> PathBuf {
    std::env::var_os("TWOPC_GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/grpcurl"))
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Json {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `grpcurl -plaintext [-d DATA] ADDR ARGS...` off the async runtime.
async fn grpcurl(addr: std::net::SocketAddr, data: Option<&str>, args: &[&str]) -> Out {
    grpcurl_with(&["-plaintext".into()], addr, data, args).await
}

/// Runs `grpcurl FLAGS... [-d DATA] ADDR ARGS...` off the async runtime.
async fn grpcurl_with(
    flags: &[String],
    addr: std::net::SocketAddr,
    data: Option<&str>,
    args: &[&str],
) -> Out {
    let bin = grpcurl_path();
    assert!(
        bin.exists(),
        "{} is missing: run `bash scripts/setup`",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.args(flags);
    if let Some(d) = data {
        cmd.args(["-d", d]);
    }
    cmd.arg(addr.to_string()).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn healthy(addr: std::net::SocketAddr) -> String {
    let mut last = String::new();
    for _ in 0..50 {
        let out = grpcurl(addr, None, &["grpc.health.v1.Health/Check"]).await;
        last = format!("{}{}", out.stdout, out.stderr);
        if out.ok && out.json()["status"] == "SERVING" {
            return "SERVING".into();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_describe_and_health_work_without_a_proto_file() {
    let sys = System::start(1).await;
    let coordinator = sys.coordinator.addr;
    let participant = sys.participants[0].addr;

    let services = grpcurl(coordinator, None, &["list"]).await;
    let described = grpcurl(participant, None, &["describe", "twopc.v1.Participant"]).await;
    let message = grpcurl(coordinator, None, &["describe", "twopc.v1.BeginRequest"]).await;

    assert!(services.ok, "{}", services.stderr);
    for s in ["twopc.v1.Coordinator", "grpc.health.v1.Health"] {
        assert!(
            services.stdout.contains(s),
            "{s} missing from:\n{}",
            services.stdout
        );
    }
    assert!(
        described.stdout.contains("rpc Execute"),
        "{}",
        described.stdout
    );
    assert!(message.stdout.contains("timeout_ms"), "{}", message.stdout);
    assert_eq!(healthy(coordinator).await, "SERVING");
    assert_eq!(
        healthy(participant).await,
        "SERVING",
        "PostgreSQL and the coordinator are up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_walked_through_by_hand_commits_in_both_databases() {
    let sys = System::start(2).await;
    sys.setup_sql(
        "CREATE TABLE acct (id int PRIMARY KEY, bal bigint); INSERT INTO acct VALUES (1, 100);",
    )
    .await;
    let coordinator = sys.coordinator.addr;
    let (p1, p2) = (sys.participants[0].addr, sys.participants[1].addr);

    let begin = grpcurl(
        coordinator,
        Some(r#"{"label":"by hand","timeout_ms":10000}"#),
        &["twopc.v1.Coordinator/Begin"],
    )
    .await;
    let txn = begin.json()["txnId"].as_str().unwrap().to_string();
    let debit = format!(
        r#"{{"txn_id":"{txn}","sql":"UPDATE acct SET bal = bal - $1 WHERE id = $2 RETURNING bal","params":[{{"int_value":30}},{{"int_value":1}}]}}"#
    );
    let credit = format!(
        r#"{{"txn_id":"{txn}","sql":"UPDATE acct SET bal = bal + $1 WHERE id = $2","params":[{{"int_value":30}},{{"int_value":1}}]}}"#
    );
    let debited = grpcurl(p1, Some(&debit), &["twopc.v1.Participant/Execute"]).await;
    let credited = grpcurl(p2, Some(&credit), &["twopc.v1.Participant/Execute"]).await;
    let id = format!(r#"{{"txn_id":"{txn}"}}"#);
    let commit = grpcurl(coordinator, Some(&id), &["twopc.v1.Coordinator/Commit"]).await;
    let shown = grpcurl(
        coordinator,
        Some(&id),
        &["twopc.v1.Coordinator/GetTransaction"],
    )
    .await;

    assert!(begin.ok, "{}", begin.stderr);
    assert_eq!(
        debited.json()["rows"][0]["values"][0]["intValue"],
        "70",
        "{}",
        debited.stdout
    );
    assert_eq!(credited.json()["rowsAffected"], "1");
    assert_eq!(commit.json()["outcome"], "OUTCOME_COMMITTED");
    assert_eq!(shown.json()["state"], "TXN_STATE_COMMITTED");
    assert_eq!(shown.json()["branches"].as_array().unwrap().len(), 2);
    assert_eq!(sys.scalar(0, "SELECT bal FROM acct").await, 70);
    assert_eq!(sys.scalar(1, "SELECT bal FROM acct").await, 130);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_statement_by_hand_shows_the_sqlstate_and_aborts() {
    let sys = System::start(1).await;
    sys.setup_sql(
        "CREATE TABLE acct (id int PRIMARY KEY, bal bigint); INSERT INTO acct VALUES (1, 100);",
    )
    .await;
    let coordinator = sys.coordinator.addr;

    let begin = grpcurl(coordinator, Some("{}"), &["twopc.v1.Coordinator/Begin"]).await;
    let txn = begin.json()["txnId"].as_str().unwrap().to_string();
    let dup = format!(r#"{{"txn_id":"{txn}","sql":"INSERT INTO acct VALUES (1, 0)"}}"#);
    let failed = grpcurl(
        sys.participants[0].addr,
        Some(&dup),
        &["twopc.v1.Participant/Execute"],
    )
    .await;
    let commit = grpcurl(
        coordinator,
        Some(&format!(r#"{{"txn_id":"{txn}"}}"#)),
        &["twopc.v1.Coordinator/Commit"],
    )
    .await;
    let malformed = grpcurl(
        coordinator,
        Some(r#"{"txn_id":"nope"}"#),
        &["twopc.v1.Coordinator/Commit"],
    )
    .await;

    assert!(!failed.ok);
    assert!(
        failed.stderr.contains("FailedPrecondition") && failed.stderr.contains("23505"),
        "{}",
        failed.stderr
    );
    assert_eq!(commit.json()["outcome"], "OUTCOME_ABORTED");
    assert!(
        commit.json()["reason"]
            .as_str()
            .unwrap()
            .contains("duplicate key")
    );
    assert!(
        !malformed.ok && malformed.stderr.contains("InvalidArgument"),
        "{}",
        malformed.stderr
    );
    assert_eq!(sys.scalar(0, "SELECT bal FROM acct").await, 100);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_from_the_shell() {
    let sys = System::start(1).await;
    let (c, p) = (sys.coordinator.addr, sys.participants[0].addr);
    let begin = |label: &'static str| async move {
        let out = grpcurl(
            c,
            Some(&format!(r#"{{"label":"{label}"}}"#)),
            &["twopc.v1.Coordinator/Begin"],
        )
        .await;
        out.json()["txnId"].as_str().unwrap().to_string()
    };
    let (a, b) = (begin("to abort").await, begin("to resolve").await);
    let id = |t: &str| format!(r#"{{"txn_id":"{t}"}}"#);

    let register = grpcurl(
        c,
        Some(&format!(
            r#"{{"txn_id":"{a}","participant_id":"by-hand","endpoint":"http://127.0.0.1:9"}}"#
        )),
        &["twopc.v1.Coordinator/RegisterBranch"],
    )
    .await;
    let listed = grpcurl(
        c,
        Some(r#"{"states":["TXN_STATE_ACTIVE"]}"#),
        &["twopc.v1.Coordinator/ListTransactions"],
    )
    .await;
    let pending = grpcurl(c, Some(&id(&a)), &["twopc.v1.Coordinator/QueryOutcome"]).await;
    let aborted = grpcurl(c, Some(&id(&a)), &["twopc.v1.Coordinator/Abort"]).await;
    let resolved = grpcurl(
        c,
        Some(&format!(
            r#"{{"txn_id":"{b}","resolution":"RESOLUTION_FORCE_ABORT","operator":"shell"}}"#
        )),
        &["twopc.v1.Coordinator/ResolveTransaction"],
    )
    .await;
    let unknown = "01a20925-7ca8-7262-8425-e73022c96b09";
    let branch = format!(r#"{{"txn_id":"{unknown}","coordinator_id":"test-coord"}}"#);
    let vote = grpcurl(p, Some(&branch), &["twopc.v1.Participant/Prepare"]).await;
    let rollback = grpcurl(p, Some(&branch), &["twopc.v1.Participant/Rollback"]).await;
    let commit = grpcurl(p, Some(&branch), &["twopc.v1.Participant/Commit"]).await;
    let recover = grpcurl(p, Some("{}"), &["twopc.v1.Participant/Recover"]).await;

    assert_eq!(
        register.json()["coordinatorId"],
        "test-coord",
        "{}",
        register.stderr
    );
    let ids: Vec<String> = listed.json()["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["txnId"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&a) && ids.contains(&b), "{ids:?}");
    assert_eq!(pending.json()["outcome"], "OUTCOME_PENDING");
    assert_eq!(aborted.json()["outcome"], "OUTCOME_ABORTED");
    assert_eq!(
        resolved.json()["state"],
        "TXN_STATE_ABORTED",
        "{}",
        resolved.stderr
    );
    assert_eq!(
        vote.json()["vote"],
        "VOTE_NO",
        "nothing ran there: {}",
        vote.stdout
    );
    assert!(
        rollback.ok,
        "nothing prepared, so rolled back: {}",
        rollback.stderr
    );
    assert!(
        !commit.ok && commit.stderr.contains("FailedPrecondition"),
        "cannot commit what never prepared: {}",
        commit.stderr
    );
    assert!(
        recover.ok && recover.json().as_object().unwrap().is_empty(),
        "nothing in doubt: {}",
        recover.stdout
    );
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_without_its_coordinator_reports_not_serving() {
    let sys = System::start(1).await;
    let participant = sys.participants[0].addr;
    assert_eq!(healthy(participant).await, "SERVING");

    sys.coordinator.kill();
    let mut status = String::new();
    for _ in 0..50 {
        let out = grpcurl(participant, None, &["grpc.health.v1.Health/Check"]).await;
        status = out.json()["status"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if status == "NOT_SERVING" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(
        status, "NOT_SERVING",
        "a branch cannot open without the coordinator"
    );
}

/// README's commands for a secured system: the CA, a client certificate and key, and a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_reaches_secured_servers_with_a_client_certificate_and_token() {
    let sys = System::start_secure(1).await;
    let token = format!(
        "authorization: Bearer {}",
        sys.tokens.as_ref().unwrap().client
    );
    let pki = sys.pki.as_ref().unwrap();
    let (cert, key) = pki.issue("grpcurl").unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let flags = [
        "-cacert".into(),
        path(&pki.ca_path()),
        "-cert".into(),
        path(&cert),
        "-key".into(),
        path(&key),
    ];
    // grpcurl retries a refused handshake until its connect timeout (10 s by default).
    let only_ca = [
        flags[0].clone(),
        flags[1].clone(),
        "-connect-timeout".into(),
        "2".into(),
    ];

    let with_token = [flags.to_vec(), vec!["-H".into(), token]].concat();
    let begun = grpcurl_with(
        &with_token,
        sys.coordinator.addr,
        Some(r#"{"label":"over TLS"}"#),
        &["twopc.v1.Coordinator/Begin"],
    )
    .await;
    let health = grpcurl_with(
        &flags,
        sys.participants[0].addr,
        None,
        &["grpc.health.v1.Health/Check"],
    )
    .await;
    let refused = grpcurl_with(&only_ca, sys.coordinator.addr, None, &["list"]).await;
    let no_token = grpcurl_with(
        &flags,
        sys.coordinator.addr,
        None,
        &["twopc.v1.Coordinator/Begin"],
    )
    .await;

    assert!(begun.ok, "{}", begun.stderr);
    assert!(begun.json()["txnId"].is_string(), "{}", begun.stdout);
    assert!(health.ok, "{}", health.stderr);
    assert!(!refused.ok, "no client certificate: {}", refused.stdout);
    assert!(
        no_token.stderr.contains("Unauthenticated"),
        "{}",
        no_token.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_in_three_calls_from_the_shell() {
    let sys = System::start(2).await;
    sys.setup_sql("CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL); INSERT INTO acct VALUES (1, 100);")
        .await;
    let (c, p1, p2) = (
        sys.coordinator.addr,
        sys.participants[0].addr,
        sys.participants[1].addr,
    );
    // A UUIDv7, as README makes one at the shell.
    let txn = twopc::proto::TxnId::generate().to_string();

    let epoch = grpcurl(c, Some("{}"), &["twopc.v1.Coordinator/GetEpoch"]).await;
    let epoch = epoch.json()["epoch"].as_str().unwrap().to_string();
    let debit = format!(
        r#"{{"txn_id":"{txn}","epoch":"{epoch}","timeout_ms":10000,"label":"by hand","statements":[{{"sql":"UPDATE acct SET bal = bal - 30 WHERE id = 1"}},{{"sql":"SELECT bal FROM acct WHERE id = 1"}}]}}"#
    );
    let debit = grpcurl(p1, Some(&debit), &["twopc.v1.Participant/Execute"]).await;
    let credit = format!(
        r#"{{"txn_id":"{txn}","epoch":"{epoch}","statements":[{{"sql":"UPDATE acct SET bal = bal + 30 WHERE id = 1"}}]}}"#
    );
    let credit = grpcurl(p2, Some(&credit), &["twopc.v1.Participant/Execute"]).await;
    let commit = format!(
        r#"{{"txn_id":"{txn}","participants":{{"names":["p1","p2"]}},"wait":"COMMIT_WAIT_DECIDED"}}"#
    );
    let commit = grpcurl(c, Some(&commit), &["twopc.v1.Coordinator/Commit"]).await;

    assert!(debit.ok, "{}", debit.stderr);
    assert_eq!(debit.json()["participantId"], "p1");
    assert_eq!(
        debit.json()["results"][1]["rows"][0]["values"][0]["intValue"],
        "70"
    );
    assert!(credit.ok, "{}", credit.stderr);
    assert!(commit.ok, "{}", commit.stderr);
    assert_eq!(commit.json()["outcome"], "OUTCOME_COMMITTED");
    support::eventually("phase 2 lands", || async {
        sys.scalar(1, "SELECT bal::int8 FROM acct WHERE id = 1")
            .await
            == 130
    })
    .await;
    assert_eq!(sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await, 70);
    sys.assert_nothing_prepared().await;
}
