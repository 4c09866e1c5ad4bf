//! The participant's branch table and in-doubt resolver, scenario by scenario, with no
//! PostgreSQL and no sockets: a [`Participant`] over a [`FakeDatabase`] and a
//! [`FakeCoordinator`], each "process" on its own runtime so a test can crash it (drop the
//! runtime, and the database loses the process's open transactions) and start another on the
//! same database, as docs/RECOVERY.md's participant rows describe.

use super::branch::{OnePhaseOutcome, Vote};
use super::branches::{AbortCause, Participant};
use super::database::{LockWait, XactStatus};
use super::error::Error;
use super::fake::{FakeCoordinator, FakeDatabase};
use super::gid::Gid;
use super::statement;
use crate::proto::marker::MarkerSecret;
use crate::proto::{Outcome, TxnId};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

const COORDINATOR: &str = "c1";

type Core = Arc<Participant<FakeDatabase, FakeCoordinator>>;

/// One participant process.
struct Process {
    runtime: tokio::runtime::Runtime,
    core: Core,
}

impl Process {
    fn start(db: &FakeDatabase, coordinator: &FakeCoordinator) -> Process {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let core = Participant::new(
            "p1".into(),
            "http://p1".into(),
            db.clone(),
            coordinator.clone(),
        );
        Process { runtime, core }
    }

    fn run<T>(&self, f: impl Future<Output = T>) -> T {
        self.runtime.block_on(f)
    }

    fn exec(&self, txn: TxnId, sql: &str) -> Result<(), Error> {
        self.run(self.core.execute(txn, sql, &[])).map(|_| ())
    }

    fn prepare(&self, txn: TxnId) -> Vote {
        self.run(self.core.prepare(txn, COORDINATOR)).unwrap()
    }

    fn commit(&self, txn: TxnId, xid: u64) -> Result<(), Error> {
        self.run(self.core.commit(txn, xid, COORDINATOR))
    }

    fn rollback(&self, txn: TxnId, xid: u64) -> Result<(), Error> {
        self.run(self.core.rollback(txn, xid, COORDINATOR))
    }

    /// The process dies: its runtime stops, and its connections close, which ends their open
    /// transactions. Prepared ones stay in the database.
    fn crash(self, db: &FakeDatabase) {
        self.runtime.shutdown_background();
        db.restart();
    }
}

fn world() -> (FakeDatabase, FakeCoordinator) {
    let deadline = crate::process::clock::now_ms() + 60_000;
    (
        FakeDatabase::default(),
        FakeCoordinator::new(COORDINATOR, deadline),
    )
}

fn gid(txn: TxnId) -> Gid {
    Gid::new(COORDINATOR, txn).unwrap()
}

fn xid_of(vote: &Vote) -> u64 {
    match vote {
        Vote::Yes { xid } => *xid,
        other => panic!("expected a yes vote, got {other:?}"),
    }
}

#[test]
fn a_branch_that_wrote_prepares_and_commits() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "UPDATE acct SET bal = bal - 1").unwrap();

    let vote = p.prepare(txn);
    p.commit(txn, xid_of(&vote)).unwrap();

    assert!(db.prepared().is_empty());
    assert_eq!(db.status(xid_of(&vote)), Some(XactStatus::Committed));
    assert_eq!(coord.registrations(txn).len(), 1, "registered once");
}

#[test]
fn concurrent_first_statements_of_one_transaction_share_one_branch() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    p.exec(TxnId::generate(), "UPDATE acct SET bal = 1")
        .unwrap();
    let txn = TxnId::generate();

    let (a, b) = p.run(async {
        tokio::join!(
            p.core.execute(txn, "INSERT INTO t VALUES (1)", &[]),
            p.core.execute(txn, "INSERT INTO t VALUES (2)", &[])
        )
    });

    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    assert_eq!(
        db.open_transactions(),
        2,
        "the first transaction's, and one for both"
    );
}

#[test]
fn repeats_after_lost_replies_answer_the_same_way() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "INSERT INTO t VALUES (1)").unwrap();
    p.exec(txn, "INSERT INTO t VALUES (2)").unwrap();

    let first = p.prepare(txn);
    let again = p.prepare(txn);
    p.commit(txn, xid_of(&first)).unwrap();
    let commit_again = p.commit(txn, xid_of(&first));

    assert_eq!(first, again);
    assert!(commit_again.is_ok(), "{commit_again:?}");
    assert_eq!(coord.registrations(txn).len(), 1);
}

#[test]
fn a_request_over_a_limit_is_refused_before_a_branch_opens() {
    let (db, coordinator) = world();
    let p = Process::start(&db, &coordinator);
    let txn = TxnId::generate();
    let too_long = format!("SELECT 1 {}", " ".repeat(statement::MAX_SQL_BYTES));

    let refused = p.exec(txn, &too_long).unwrap_err();

    assert_eq!(
        tonic::Status::from(refused).code(),
        tonic::Code::InvalidArgument
    );
    assert!(
        coordinator.registrations(txn).is_empty(),
        "nothing enlisted"
    );
    assert_eq!(db.open_transactions(), 0, "no connection taken");
    p.exec(txn, "UPDATE t SET x = 1").unwrap();
    assert_eq!(
        db.open_transactions(),
        1,
        "the next statement opens the branch"
    );
}

#[test]
fn a_failed_statement_dooms_the_branch_to_vote_no() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "INSERT INTO t VALUES (1)").unwrap();

    let failed = p.exec(txn, "INSERT that will fail").unwrap_err();
    let later = p.exec(txn, "SELECT 1").unwrap_err();
    let vote = p.prepare(txn);

    assert!(matches!(failed, Error::Statement { sqlstate: Some(ref s), .. } if s == "23505"));
    assert!(later.to_string().contains("failed earlier"), "{later}");
    assert!(matches!(vote, Vote::No { reason } if reason.contains("23505")));
    assert_eq!(db.open_transactions(), 0, "rolled back at the vote");
    assert!(db.prepared().is_empty());
}

#[test]
fn a_branch_that_only_read_votes_read_only_and_holds_nothing() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "SELECT 1").unwrap();

    assert_eq!(p.prepare(txn), Vote::ReadOnly);
    assert!(db.prepared().is_empty());
}

#[test]
fn a_rollback_cancels_a_statement_stuck_on_a_lock() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "UPDATE acct SET bal = 0").unwrap();
    let core = Arc::clone(&p.core);
    let stuck = p
        .runtime
        .spawn(async move { core.execute(txn, "SELECT sleep_on_a_lock()", &[]).await });
    // Let it start and block (a current-thread runtime runs it only when we yield).
    p.run(async { tokio::time::sleep(Duration::from_millis(10)).await });

    p.rollback(txn, 0).unwrap();

    let stuck = p.run(stuck).unwrap();
    assert!(matches!(stuck, Err(Error::Statement { sqlstate: Some(ref s), .. }) if s == "57014"));
    assert_eq!(db.open_transactions(), 0);
    assert!(
        matches!(p.prepare(txn), Vote::No { .. }),
        "rolled back: it cannot vote yes"
    );
}

#[test]
fn waits_name_both_branches_and_a_deadlock_victims_statement_fails_with_its_cause() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let (holder, waiter) = (TxnId::generate(), TxnId::generate());
    p.exec(holder, "UPDATE acct SET bal = 0").unwrap(); // connection 1
    assert!(
        p.run(p.core.waits(Duration::ZERO)).unwrap().is_empty(),
        "no statement running: the database is not even asked"
    );
    let core = Arc::clone(&p.core);
    let stuck = p.runtime.spawn(async move {
        core.execute(waiter, "UPDATE acct SET bal = sleep_on_a_lock()", &[])
            .await
    }); // connection 2
    p.run(async { tokio::time::sleep(Duration::from_millis(10)).await });
    db.set_waits(vec![LockWait {
        waiter: 2,
        holder: 1,
        holder_text: "pid 1".into(),
        holder_gid: None,
        waited_ms: 700,
        lock: "transactionid (ShareLock)".into(),
    }]);

    let waits = p.run(p.core.waits(Duration::ZERO)).unwrap();
    let cause = AbortCause {
        reason: "distributed deadlock (SQLSTATE 40P01): chosen".into(),
        sqlstate: "40P01".into(),
    };
    p.run(p.core.rollback_because(waiter, 0, COORDINATOR, Some(cause)))
        .unwrap();

    assert_eq!(waits.len(), 1);
    assert_eq!(waits[0].waiter, waiter);
    assert_eq!(waits[0].holder_txn, Some(holder));
    let stuck = p.run(stuck).unwrap().unwrap_err();
    assert!(
        matches!(&stuck, Error::Statement { sqlstate: Some(s), message, .. }
            if s == "40P01" && message.contains("distributed deadlock")),
        "{stuck:?}"
    );
}

#[test]
fn a_services_work_cancelled_halfway_dooms_the_branch() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();

    // The handler running the work is dropped (its caller cancelled) while the work waits.
    let cancelled = p.run(async {
        let work = p.core.with_branch(txn, None, |_conn| {
            Box::pin(async {
                std::future::pending::<()>().await;
                Ok::<_, Error>(())
            })
        });
        tokio::time::timeout(Duration::from_millis(20), work).await
    });

    assert!(cancelled.is_err(), "the work never finished");
    assert!(
        matches!(p.prepare(txn), Vote::No { reason } if reason.contains("cancelled")),
        "half of the work must not commit"
    );
}

#[test]
fn a_prepare_that_breaks_after_preparing_votes_no_and_the_rollback_settles_it() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "UPDATE acct SET bal = 0").unwrap();
    db.break_next_prepare(true);

    let vote = p.prepare(txn);
    assert!(matches!(vote, Vote::No { ref reason } if reason.contains("did not complete")));
    assert_eq!(
        db.prepared(),
        vec![gid(txn).to_string()],
        "prepared all the same"
    );

    p.rollback(txn, 0).unwrap();

    assert!(db.prepared().is_empty());
}

#[test]
fn a_prepare_that_breaks_before_preparing_leaves_nothing_to_settle() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "UPDATE acct SET bal = 0").unwrap();
    db.break_next_prepare(false);

    assert!(matches!(p.prepare(txn), Vote::No { .. }));
    p.rollback(txn, 0).unwrap();

    assert!(db.prepared().is_empty());
    assert_eq!(db.open_transactions(), 0);
}

#[test]
fn after_a_restart_an_open_branch_is_gone_and_a_prepared_one_commits_by_gid() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let (prepared, open) = (TxnId::generate(), TxnId::generate());
    p.exec(prepared, "UPDATE acct SET bal = 1").unwrap();
    let xid = xid_of(&p.prepare(prepared));
    p.exec(open, "UPDATE acct SET bal = 2").unwrap();

    p.crash(&db);
    let p = Process::start(&db, &coord);

    assert!(matches!(p.prepare(open), Vote::No { ref reason } if reason.contains("not open")));
    assert_eq!(p.prepare(prepared), Vote::Yes { xid }, "found by gid");
    p.commit(prepared, xid).unwrap();
    assert_eq!(db.status(xid), Some(XactStatus::Committed));
    assert!(
        p.commit(prepared, xid).is_ok(),
        "a repeat checks the xid: committed"
    );
}

#[test]
fn a_phase_two_request_against_how_the_branch_ended_is_an_alarm() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "UPDATE acct SET bal = 1").unwrap();
    let xid = xid_of(&p.prepare(txn));
    p.crash(&db);
    db.finish_directly(&gid(txn), true); // a DBA committed it by hand
    let p = Process::start(&db, &coord);

    let rollback = p.rollback(txn, xid).unwrap_err();
    let commit = p.commit(txn, xid);

    assert!(
        rollback.to_string().contains("ATOMICITY ALARM"),
        "{rollback}"
    );
    assert!(commit.is_ok(), "committed is what a commit asks for");
    assert!(
        matches!(
            p.commit(TxnId::generate(), 0),
            Err(Error::FailedPrecondition(_))
        ),
        "a commit of an unknown gid without an xid cannot be taken as done"
    );
}

#[test]
fn the_resolver_applies_what_the_coordinator_decided_and_leaves_the_rest() {
    let (db, coord) = world();
    let (committed, aborted, pending) = (TxnId::generate(), TxnId::generate(), TxnId::generate());
    for txn in [committed, aborted, pending] {
        db.prepare_directly(&gid(txn));
    }
    let foreign = Gid::new("someone-else", TxnId::generate()).unwrap();
    db.prepare_directly(&foreign);
    coord.decide(committed, Outcome::Committed);
    coord.decide(pending, Outcome::Pending);
    // `aborted` has no record: presumed abort.
    let p = Process::start(&db, &coord);

    let pass = p.run(p.core.resolve_in_doubt(Duration::ZERO)).unwrap();

    assert_eq!(
        (
            pass.in_doubt,
            pass.committed,
            pass.rolled_back,
            pass.pending,
            pass.foreign
        ),
        (4, 1, 1, 1, 1)
    );
    let mut left = db.prepared();
    left.sort();
    let mut expected = vec![gid(pending).to_string(), foreign.to_string()];
    expected.sort();
    assert_eq!(left, expected);
}

#[test]
fn an_open_branch_whose_transaction_the_coordinator_forgot_is_rolled_back_before_its_deadline() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let (forgotten, live) = (TxnId::generate(), TxnId::generate());
    p.exec(forgotten, "UPDATE acct SET bal = 1").unwrap();
    p.exec(live, "UPDATE acct SET bal = 2").unwrap();
    // `live` runs on at the coordinator; of `forgotten` it knows nothing (it restarted before
    // logging it), so it presumes abort.
    coord.decide(live, Outcome::Pending);

    let too_young = p.run(p.core.resolve_forgotten(Duration::from_secs(60)));
    let rolled_back = p.run(p.core.resolve_forgotten(Duration::ZERO));

    assert_eq!((too_young, rolled_back), (0, 1));
    assert_eq!(db.open_transactions(), 1, "only the live transaction's");
    assert!(matches!(p.prepare(forgotten), Vote::No { .. }));
    assert!(matches!(p.prepare(live), Vote::Yes { .. }));
}

#[test]
fn while_the_coordinator_is_unreachable_in_doubt_branches_stay_prepared() {
    let (db, coord) = world();
    let txn = TxnId::generate();
    db.prepare_directly(&gid(txn));
    coord.set_reachable(false);
    let p = Process::start(&db, &coord);

    let pass = p.run(p.core.resolve_in_doubt(Duration::ZERO)).unwrap();

    assert_eq!(pass.unresolved, 1);
    assert_eq!(
        db.prepared(),
        vec![gid(txn).to_string()],
        "no heuristic decision"
    );

    coord.set_reachable(true);
    coord.decide(txn, Outcome::Committed);
    let pass = p.run(p.core.resolve_in_doubt(Duration::ZERO)).unwrap();
    assert_eq!(pass.committed, 1);
    assert!(db.prepared().is_empty());
}

#[test]
fn a_branch_past_its_deadline_is_rolled_back_and_stays_refused() {
    let db = FakeDatabase::default();
    let coord = FakeCoordinator::new(COORDINATOR, crate::process::clock::now_ms() - 5_000);
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "UPDATE acct SET bal = 0").unwrap();

    let started = Instant::now();
    p.run(async {
        while db.open_transactions() > 0 {
            assert!(started.elapsed() < Duration::from_secs(5), "never expired");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });

    let late = p.exec(txn, "UPDATE acct SET bal = 1").unwrap_err();
    assert!(late.to_string().contains("rolled back"), "{late}");
    assert_eq!(
        coord.registrations(txn).len(),
        1,
        "no fresh branch was opened"
    );
}

// ---- No half transactions: an ended branch is never reopened ----

#[test]
fn a_branch_rolled_back_out_of_turn_refuses_later_statements_and_votes_no() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "UPDATE acct SET bal = bal - 100").unwrap();

    // An operator (or anyone) rolls the open branch back while the transaction is active.
    p.rollback(txn, 0).unwrap();
    let later = p.exec(txn, "UPDATE acct SET bal = bal - 1").unwrap_err();
    let vote = p.prepare(txn);

    assert!(later.to_string().contains("rolled back"), "{later}");
    assert!(matches!(vote, Vote::No { .. }), "{vote:?}");
    assert_eq!(coord.registrations(txn).len(), 1, "no second branch");
    assert_eq!(db.open_transactions(), 0);
    assert!(db.prepared().is_empty());
}

#[test]
fn a_branch_prepared_out_of_turn_refuses_later_statements_and_votes_no() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "UPDATE acct SET bal = bal - 100").unwrap();
    let early = p.prepare(txn);

    let later = p.exec(txn, "UPDATE acct SET bal = bal - 1").unwrap_err();
    let vote = p.prepare(txn);
    p.rollback(txn, xid_of(&early)).unwrap();

    assert!(later.to_string().contains("prepared"), "{later}");
    assert!(matches!(vote, Vote::No { .. }), "{vote:?}");
    assert_eq!(coord.registrations(txn).len(), 1, "no second branch");
    assert!(db.prepared().is_empty());
}

#[test]
fn a_branch_prepared_and_committed_out_of_turn_refuses_later_statements() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "UPDATE acct SET bal = bal - 100").unwrap();
    let vote = p.prepare(txn);
    p.commit(txn, xid_of(&vote)).unwrap();

    let later = p.exec(txn, "UPDATE acct SET bal = bal - 1").unwrap_err();

    assert!(later.to_string().contains("committed"), "{later}");
    assert_eq!(coord.registrations(txn).len(), 1, "no second branch");
    assert_eq!(db.open_transactions(), 0);
}

#[test]
fn an_ended_branch_answers_repeated_requests_as_it_ended() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let (committed, rolled_back) = (TxnId::generate(), TxnId::generate());
    p.exec(committed, "INSERT INTO t VALUES (1)").unwrap();
    p.exec(rolled_back, "INSERT INTO t VALUES (2)").unwrap();
    let vote = p.prepare(committed);
    p.commit(committed, xid_of(&vote)).unwrap();
    p.rollback(rolled_back, 0).unwrap();

    assert_eq!(p.prepare(committed), Vote::Yes { xid: 0 });
    assert!(p.commit(committed, xid_of(&vote)).is_ok());
    let contrary = p
        .rollback(committed, xid_of(&vote))
        .unwrap_err()
        .to_string();
    assert!(
        contrary.contains("ATOMICITY ALARM"),
        "committed stays committed, and a contrary request is checked by the database: {contrary}"
    );
    assert!(matches!(p.prepare(rolled_back), Vote::No { .. }));
    assert!(p.rollback(rolled_back, 0).is_ok());
    assert!(
        p.commit(rolled_back, 0).is_err(),
        "rolled back stays rolled back"
    );
    assert!(matches!(
        p.commit_one_phase(rolled_back, &[]),
        Ok(OnePhaseOutcome::Aborted { .. })
    ));
}

// ---- One-phase commit of a lone branch (docs/PROTOCOL.md) ----

impl Process {
    /// As the coordinator asks: each transaction's marker under its own secret.
    fn commit_one_phase(&self, txn: TxnId, forget: &[TxnId]) -> Result<OnePhaseOutcome, Error> {
        let forget: Vec<MarkerSecret> = forget.iter().map(|f| secret(*f)).collect();
        self.run(
            self.core
                .commit_one_phase(txn, COORDINATOR, &secret(txn), &forget),
        )
    }
}

/// A marker secret per transaction, the same on every ask (the coordinator's is an HMAC).
fn secret(txn: TxnId) -> MarkerSecret {
    MarkerSecret::new(txn.as_bytes().to_vec()).unwrap()
}

const COMMITTED: OnePhaseOutcome = OnePhaseOutcome::Committed { read_only: false };

fn aborted(outcome: Result<OnePhaseOutcome, Error>) -> bool {
    matches!(outcome, Ok(OnePhaseOutcome::Aborted { .. }))
}

#[test]
fn a_lone_branch_commits_in_one_phase_with_its_marker_and_a_repeat_reads_it() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "UPDATE acct SET bal = bal - 1").unwrap();

    assert_eq!(p.commit_one_phase(txn, &[]).unwrap(), COMMITTED);

    assert!(db.prepared().is_empty(), "never prepared");
    assert_eq!(db.markers().get(&gid(txn).to_string()), Some(&true));
    assert_eq!(
        p.commit_one_phase(txn, &[]).unwrap(),
        COMMITTED,
        "the repeat, with the branch gone from the table, reads the marker"
    );
}

#[test]
fn a_one_phase_commit_whose_connection_broke_after_its_commit_is_told_by_the_marker() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "INSERT INTO t VALUES (1)").unwrap();
    db.break_next_one_phase(true);

    assert_eq!(p.commit_one_phase(txn, &[]).unwrap(), COMMITTED);
}

#[test]
fn a_one_phase_commit_whose_connection_broke_before_its_commit_is_fenced_off() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "INSERT INTO t VALUES (1)").unwrap();
    db.break_next_one_phase(false);

    assert!(aborted(p.commit_one_phase(txn, &[])));
    assert_eq!(
        db.markers().get(&gid(txn).to_string()),
        Some(&false),
        "the fence rules out a late commit"
    );
    assert!(aborted(p.commit_one_phase(txn, &[])), "and a repeat agrees");
}

#[test]
fn after_a_restart_a_lost_branch_is_fenced_and_a_committed_one_is_told() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let committed = TxnId::generate();
    p.exec(committed, "INSERT INTO t VALUES (1)").unwrap();
    p.commit_one_phase(committed, &[]).unwrap();
    let lost = TxnId::generate();
    p.exec(lost, "INSERT INTO t VALUES (2)").unwrap();
    p.crash(&db);

    let p = Process::start(&db, &coord);

    assert!(aborted(p.commit_one_phase(lost, &[])));
    assert_eq!(p.commit_one_phase(committed, &[]).unwrap(), COMMITTED);
}

#[test]
fn a_doomed_or_refused_lone_branch_answers_aborted() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let doomed = TxnId::generate();
    let _ = p.exec(doomed, "INSERT fail");
    assert!(aborted(p.commit_one_phase(doomed, &[])));
    assert_eq!(db.open_transactions(), 0, "rolled back");

    db.refuse_one_phase(true);
    let refused = TxnId::generate();
    p.exec(refused, "INSERT INTO t VALUES (1)").unwrap();
    let outcome = p.commit_one_phase(refused, &[]);
    assert!(
        matches!(&outcome, Ok(OnePhaseOutcome::Aborted { reason }) if reason.contains("23503")),
        "{outcome:?}"
    );
    assert!(!db.markers().contains_key(&gid(refused).to_string()));
}

#[test]
fn a_lone_branch_that_wrote_nothing_commits_without_a_marker() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let txn = TxnId::generate();
    p.exec(txn, "SELECT 1").unwrap();

    assert_eq!(
        p.commit_one_phase(txn, &[]).unwrap(),
        OnePhaseOutcome::Committed { read_only: true }
    );
    assert!(db.markers().is_empty());
}

#[test]
fn markers_the_coordinator_is_done_with_go_in_the_next_commit() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let first = TxnId::generate();
    p.exec(first, "INSERT INTO t VALUES (1)").unwrap();
    p.commit_one_phase(first, &[]).unwrap();
    let second = TxnId::generate();
    p.exec(second, "INSERT INTO t VALUES (2)").unwrap();

    p.commit_one_phase(second, &[first]).unwrap();

    let markers: Vec<String> = db.markers().into_keys().collect();
    assert_eq!(markers, vec![gid(second).to_string()]);
}

#[test]
fn a_transaction_too_old_to_tell_is_refused_not_fenced() {
    let (db, coord) = world();
    let p = Process::start(&db, &coord);
    let eight_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 8 * 24 * 3600;
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, eight_days_ago, 0);
    let old = TxnId::from_bytes(uuid::Uuid::new_v7(ts).as_bytes()).unwrap();

    let answer = p.commit_one_phase(old, &[]);

    assert!(
        matches!(&answer, Err(Error::FailedPrecondition(m)) if m.contains("too old")),
        "{answer:?}"
    );
    assert!(db.markers().is_empty(), "no fence was written");
}
