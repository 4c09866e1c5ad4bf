//! Crash recovery, end to end: runs the `crashtest` harness's deterministic pass, which fires
//! every named failpoint once under a bank-transfer load against real processes and real
//! PostgreSQL, and checks atomicity, durability and recovery after each: once with the
//! `participant` binary in front of each database, once with services that embed their
//! participant (the `ledger` example), and once more for the coordinator's failpoints with
//! three coordinator replicas on etcd, where another replica recovers from the leader's crash. Needs the `testing` feature and the examples built with
//! it (`cargo test --all-targets --features testing`, as scripts/test runs).
#![cfg(feature = "testing")]

use std::process::Command;
use std::sync::Mutex;

/// Each pass runs a whole system under load; two at once on a small machine would slow each
/// other past the harness's timeouts.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn crashtest(args: &[&str]) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_crashtest"))
        .args(args)
        .output()
        .expect("run crashtest");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.stderr.is_empty() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        out.status.success(),
        "crashtest {} failed ({}); its output is above",
        args.join(" "),
        out.status
    );
}

#[test]
fn every_failpoint_recovers_under_load() {
    crashtest(&["--failpoints", "all", "--clients", "4"]);
}

#[test]
fn every_failpoint_recovers_with_participants_embedded_in_services() {
    crashtest(&["--embedded", "--failpoints", "all", "--clients", "4"]);
}

/// The coordinator's failpoints only: the participants' do not change with replicas.
#[test]
fn a_replica_recovers_from_the_leader_crashing_at_every_coordinator_failpoint() {
    let coordinator: Vec<&str> = twopc::process::failpoints::ALL
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| name.starts_with("coordinator::"))
        .collect();
    crashtest(&[
        "--ha",
        "--failpoints",
        &coordinator.join(","),
        "--clients",
        "4",
    ]);
}

/// Sagas (docs/SAGAS.md §5): each saga failpoint fired once under a saga load; every saga
/// ends completed with each action applied once, or compensated with each applied action
/// undone once.
#[test]
fn every_saga_failpoint_recovers_under_load() {
    crashtest(&["--saga", "--failpoints", "all", "--clients", "4"]);
}

/// The saga coordinator failpoints with three replicas on etcd: another replica resumes every
/// saga from the log on etcd.
#[test]
fn a_replica_resumes_every_saga_after_the_leader_crashes_at_each_saga_failpoint() {
    let coordinator: Vec<&str> = twopc::process::failpoints::SAGA
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| name.starts_with("coordinator::"))
        .collect();
    crashtest(&[
        "--saga",
        "--ha",
        "--failpoints",
        &coordinator.join(","),
        "--clients",
        "4",
    ]);
}
