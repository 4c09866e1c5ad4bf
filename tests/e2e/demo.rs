//! README's main job, `bash scripts/demo`, end to end: the bank demo, the coordinator replicas on
//! etcd with the leader killed (`--ha`), the order saga (`--saga`) and, with `--services`,
//! the services that embed their participant. Each demo checks every scene itself (balances,
//! audit records, nothing left prepared) and exits non-zero on any surprise. `--services`
//! crashes a service at a named failpoint, so this needs the `testing` feature and the
//! examples built with it (`cargo test --all-targets --features testing`).
#![cfg(feature = "testing")]

use std::process::Command;

fn demo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(args)
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "demo {args:?} failed ({})",
        out.status
    );
    stdout
}

#[test]
fn the_bank_demo_runs_every_scene() {
    let out = demo(&["--clients", "4", "--transfers", "10"]);

    assert!(out.contains("total money before"), "{out}");
    assert!(out.contains("conserved"), "{out}");
}

#[test]
fn the_services_demo_commits_aborts_everywhere_and_recovers_a_crashed_service() {
    let out = demo(&["--services"]);

    assert!(
        out.contains("branch audit at"),
        "the nested service joined: {out}"
    );
    assert!(out.contains("ABORTED everywhere"), "{out}");
    assert!(out.contains("ledger-b died (signal: 6"), "{out}");
    assert!(
        out.contains("prepared transactions left in PostgreSQL: 0"),
        "{out}"
    );
}

#[test]
fn the_ha_demo_keeps_committing_through_the_leaders_death() {
    let out = demo(&["--ha"]);

    assert!(out.contains("took over"), "{out}");
    assert!(
        out.contains("first transfer committed through the new leader"),
        "{out}"
    );
    assert!(out.contains("conserved"), "{out}");
    assert!(out.contains("east 0, west 0"), "{out}");
}

#[test]
fn the_saga_demo_completes_one_order_and_compensates_a_declined_one() {
    let out = demo(&["--saga"]);

    assert!(out.contains("saga order-alice: Completed"), "{out}");
    assert!(out.contains("saga order-bob: Compensated because"), "{out}");
    assert!(out.contains("card declined"), "{out}");
    assert!(
        out.contains("2 books in stock, 1 order(s); payments: 1 charge(s)"),
        "{out}"
    );
}
