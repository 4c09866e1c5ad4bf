//! Crash recovery, end to end: runs the `crashtest` harness's deterministic pass, which fires
//! every named failpoint once under a bank-transfer load against real processes and real
//! PostgreSQL, and checks atomicity, durability and recovery after each. Needs the `testing`
//! feature (`cargo test --features testing --test crash`).
#![cfg(feature = "testing")]

use std::process::Command;

#[test]
fn every_failpoint_recovers_under_load() {
    let out = Command::new(env!("CARGO_BIN_EXE_crashtest"))
        .args(["--failpoints", "all", "--clients", "4"])
        .output()
        .expect("run crashtest");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.stderr.is_empty() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        out.status.success(),
        "crashtest failed ({}); its output is above",
        out.status
    );
}
