//! The commit driver and recovery, crash by crash, with no network, no sled and no PostgreSQL.
//!
//! Each test is one row of docs/RECOVERY.md's crash table, or one of the failures around it:
//! a coordinator runs on its own runtime over a [`MemLog`] and [`FakeParticipants`]; the test
//! stops it at the named step by making a participant or the disk hang there, "crashes" it by
//! dropping the runtime (every task dies mid-await, nothing more is written), restarts a new
//! coordinator on what the log had made durable, and checks the outcome: what the restarted
//! coordinator answers, and what every participant's database ends up holding. The fake
//! participants outlive the crash, as real ones (and their prepared transactions) would.

use super::error::Error;
use super::log::{Log, MemLog};
use super::participants::fake::{
    Behaviour, Call, FakeParticipants, OnFinish, OnOnePhase, OnPrepare,
};
use super::transactions::{Coordinator, Limits};
use super::txn::{Outcome, State};
use super::wire;
use crate::proto::{self, TxnId};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

const P1: &str = "http://p1";
const P2: &str = "http://p2";

pub(super) type Core = Arc<Coordinator<MemLog, FakeParticipants>>;

/// One coordinator process: its runtime (whose end is the process's end) and its core.
pub(super) struct Process {
    runtime: tokio::runtime::Runtime,
    pub(super) core: Core,
    pub(super) log: MemLog,
}

impl Process {
    /// Starts a coordinator on `log`, recovering what it holds, as the binary does.
    pub(super) fn start(log: MemLog, participants: &FakeParticipants) -> Process {
        Process::start_with(log, participants, scenario_limits())
    }

    fn start_with(log: MemLog, participants: &FakeParticipants, limits: Limits) -> Process {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let core =
            Coordinator::with_participants("c1".into(), log.clone(), participants.clone(), limits)
                .unwrap();
        runtime.block_on(async { core.recover().unwrap() });
        Process { runtime, core, log }
    }

    /// Runs `f` on this process's runtime; its background tasks make progress meanwhile.
    pub(super) fn run<T>(&self, f: impl Future<Output = T>) -> T {
        self.runtime.block_on(f)
    }

    /// Runs `f` in the background, as a client's call in flight.
    fn spawn<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) {
        self.runtime.spawn(f);
    }

    /// Lets the process run until `done` holds (at most 5 s, then the test fails).
    pub(super) fn until(&self, what: &str, done: impl Fn() -> bool) {
        let started = Instant::now();
        self.run(async {
            while !done() {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "timed out waiting until {what}"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }

    /// The process dies: every task stops where it is, and only what was synced survives.
    pub(super) fn crash(self) -> MemLog {
        let survivors = self.log.crash();
        self.runtime.shutdown_background();
        survivors
    }

    /// Begins a transaction with a branch on each endpoint (participant id = its host).
    fn begin_with(&self, endpoints: &[&str]) -> TxnId {
        self.run(async {
            let (id, _) = self.core.begin(30_000, "scenario".into()).unwrap();
            for ep in endpoints {
                let participant = ep.trim_start_matches("http://");
                self.core
                    .register_branch(id, participant, ep, "instance-1", false)
                    .await
                    .unwrap();
            }
            id
        })
    }

    /// Begins a transaction whose lone branch, on `endpoint`, can commit in one phase.
    fn begin_one_phase(&self, endpoint: &str) -> TxnId {
        self.run(async {
            let (id, _) = self.core.begin(30_000, "one phase".into()).unwrap();
            let participant = endpoint.trim_start_matches("http://");
            self.core
                .register_branch(id, participant, endpoint, "instance-1", true)
                .await
                .unwrap();
            id
        })
    }

    /// Sends Commit in the background (a client whose call is in flight when the crash comes).
    fn commit_in_background(&self, id: TxnId) {
        let core = Arc::clone(&self.core);
        self.spawn(async move { core.commit(id, Duration::from_millis(200)).await });
    }

    fn commit(&self, id: TxnId) -> Outcome {
        self.run(self.core.commit(id, Duration::from_millis(200)))
            .unwrap()
            .outcome
    }

    fn query(&self, id: TxnId) -> Outcome {
        self.core.query_outcome(id, "").unwrap()
    }

    fn shown_state(&self, id: TxnId) -> proto::TxnState {
        wire::transaction(&self.core.get(id).unwrap()).state()
    }

    /// Waits until the transaction has left the live table, finished.
    fn until_finished(&self, id: TxnId) {
        self.until("the transaction finished", || self.core.live(id).is_none());
    }
}

/// Short waits, so that a scenario's retries happen within its few seconds.
pub(super) fn scenario_limits() -> Limits {
    Limits {
        prepare_timeout: Duration::from_millis(300),
        commit_wait: Duration::from_millis(200),
        retry_min: Duration::from_millis(1),
        retry_max: Duration::from_millis(5),
        ..Limits::default()
    }
}

fn participants() -> FakeParticipants {
    FakeParticipants::default()
}

fn behave(prepare: OnPrepare, finish: OnFinish) -> Behaviour {
    Behaviour {
        prepare,
        finish,
        ..Behaviour::default()
    }
}

/// Every participant's database ended the way the coordinator decided, and nothing is left
/// prepared: what every scenario must end with.
fn assert_settled(ps: &FakeParticipants, id: TxnId, committed: bool) {
    for ep in [P1, P2] {
        assert!(
            ps.prepared(ep).is_empty(),
            "{ep} still holds a prepared branch"
        );
        if committed {
            assert!(ps.committed(ep, id), "{ep} did not commit");
        } else {
            assert!(
                !ps.committed(ep, id),
                "{ep} committed an aborted transaction"
            );
        }
    }
    assert_eq!(ps.alarms(), 0, "a branch ended against the decision");
}

// ---- The happy paths, and what they cost ----

#[test]
fn all_yes_commits_every_branch_and_flushes_once_for_the_decision() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);
    let syncs_before = c.log.syncs();

    assert_eq!(c.commit(id), Outcome::Committed);

    c.until_finished(id);
    assert_settled(&ps, id, true);
    assert_eq!(
        c.log.syncs(),
        syncs_before + 1,
        "one forced write: the decision"
    );
    assert_eq!(c.shown_state(id), proto::TxnState::Committed);
}

#[test]
fn read_only_branches_commit_without_a_forced_write() {
    let ps = participants();
    ps.set(P1, behave(OnPrepare::ReadOnly, OnFinish::Ack));
    ps.set(P2, behave(OnPrepare::ReadOnly, OnFinish::Ack));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);
    let syncs_before = c.log.syncs();

    assert_eq!(c.commit(id), Outcome::Committed);

    assert_eq!(
        c.log.syncs(),
        syncs_before,
        "nothing prepared, nothing to make durable"
    );
    assert!(
        !ps.calls(P1).contains(&Call::Commit(id)),
        "no phase 2 for read-only"
    );
}

#[test]
fn a_no_vote_aborts_and_rolls_back_the_prepared_branch() {
    let ps = participants();
    ps.set(P2, behave(OnPrepare::No, OnFinish::Ack));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);

    assert_eq!(c.commit(id), Outcome::Aborted);

    c.until_finished(id);
    assert_settled(&ps, id, false);
    assert!(ps.rolled_back(P1, id));
    let reason = wire::transaction(&c.core.get(id).unwrap()).reason;
    assert!(
        reason.contains("p2") && reason.contains("23503"),
        "{reason}"
    );
}

#[test]
fn concurrent_commits_and_an_abort_share_one_run_and_one_outcome() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);

    let (first, second, abort) = c.run(async {
        futures::future::join3(
            c.core.commit(id, Duration::ZERO),
            c.core.commit(id, Duration::ZERO),
            c.core.abort(id, "changed my mind"),
        )
        .await
    });

    // The abort arrived while votes were coming in, and an abort in phase 1 wins.
    assert_eq!(first.unwrap().outcome, Outcome::Aborted);
    assert_eq!(second.unwrap().outcome, Outcome::Aborted);
    assert_eq!(abort.unwrap(), Outcome::Aborted);
    let prepares = ps
        .calls(P1)
        .iter()
        .filter(|c| **c == Call::Prepare(id))
        .count();
    assert_eq!(prepares, 1, "one phase 1, however many callers");
    c.until_finished(id);
    assert_settled(&ps, id, false);
}

#[test]
fn the_deadline_aborts_an_active_transaction() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let id = c.run(async {
        let (id, _) = c.core.begin(20, "short".into()).unwrap();
        c.core
            .register_branch(id, "p1", P1, "i", false)
            .await
            .unwrap();
        id
    });

    c.until("the deadline aborted it", || {
        c.query(id) == Outcome::Aborted
    });

    assert_eq!(c.commit(id), Outcome::Aborted);
    c.until_finished(id);
    assert!(ps.calls(P1).contains(&Call::Rollback(id)));
}

// ---- Coordinator crashes, at each failpoint of docs/FAILPOINTS.md ----

#[test]
fn crash_after_branch_registered_aborts_and_rolls_back() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);

    let c = Process::start(c.crash(), &ps);

    assert_eq!(c.query(id), Outcome::Aborted);
    c.until_finished(id);
    assert!(ps.calls(P1).contains(&Call::Rollback(id)));
    assert!(ps.calls(P2).contains(&Call::Rollback(id)));
    assert_eq!(
        c.commit(id),
        Outcome::Aborted,
        "a retried Commit hears the truth"
    );
    assert_settled(&ps, id, false);
}

/// A participant whose branch names another coordinator (two coordinators sharing a
/// database) asks this one by mistake: it must not hear the presumed abort that would undo the
/// other's commit.
#[test]
fn another_coordinators_transaction_is_not_presumed_aborted() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let id = TxnId::generate();

    let refused = c.core.query_outcome(id, "c2");

    assert!(
        matches!(&refused, Err(super::error::Error::NotOurs { owner, .. }) if owner == "c2"),
        "{refused:?}"
    );
    assert_eq!(c.core.query_outcome(id, "c1").unwrap(), Outcome::Aborted);
}

#[test]
fn crash_with_no_record_at_all_is_a_presumed_abort() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    c.begin_with(&[P1]); // enlists p1 durably once
    let id = c.begin_with(&[P1]); // a known participant: its registration is not forced

    let c = Process::start(c.crash(), &ps);

    assert_eq!(c.query(id), Outcome::Aborted, "no record: presumed abort");
    assert!(matches!(
        c.run(c.core.commit(id, Duration::ZERO)),
        Err(super::error::Error::NotFound(_))
    ));
}

/// A transaction the client started itself: its first enlistment, on `endpoint`, creates it.
fn started_on(c: &Process, endpoint: &str, start: &proto::Start) -> Result<TxnId, Error> {
    let id = TxnId::generate();
    let participant = endpoint.trim_start_matches("http://");
    c.run(
        c.core
            .register(id, Some(start), participant, endpoint, "instance-1", false),
    )?;
    Ok(id)
}

fn start_in(c: &Process) -> proto::Start {
    proto::Start {
        epoch: c.core.epoch(),
        timeout_ms: 30_000,
        label: "three calls".into(),
    }
}

#[test]
fn crash_after_a_first_enlistment_leaves_nothing_a_late_branch_can_continue() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    c.begin_with(&[P1, P2]); // both enlisted durably, so their registrations are not forced
    let start = start_in(&c);
    let id = started_on(&c, P1, &start).unwrap();

    // The hint was never synced: the restarted coordinator has no trace of the transaction.
    let c = Process::start(c.crash(), &ps);
    let late = c.run(
        c.core
            .register(id, Some(&start), "p2", P2, "instance-1", false),
    );
    let fresh = started_on(&c, P2, &start);
    let commit = c.run(
        c.core
            .commit_named(id, Some(&["p1".into(), "p2".into()]), Duration::ZERO),
    );

    assert!(c.core.epoch() > start.epoch, "every start is a new epoch");
    assert!(
        matches!(
            late,
            Err(Error::Refused(super::epoch::Refusal::Stale { .. }))
        ),
        "{late:?}"
    );
    assert!(matches!(fresh, Err(Error::Refused(_))), "{fresh:?}");
    let commit = commit.unwrap();
    assert_eq!(
        commit.outcome,
        Outcome::Aborted,
        "presumed abort, not NOT_FOUND"
    );
    assert!(commit.reason.contains("no record"), "{}", commit.reason);
}

#[test]
fn crash_after_a_synced_first_enlistment_aborts_it_and_refuses_its_late_branches() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let start = start_in(&c);
    // A new participant: its registry entry is forced, and with it the Active hint.
    let id = started_on(&c, P1, &start).unwrap();

    let c = Process::start(c.crash(), &ps);
    c.until_finished(id);
    let late = c.run(
        c.core
            .register(id, Some(&start), "p2", P2, "instance-1", false),
    );

    assert_eq!(c.query(id), Outcome::Aborted);
    assert!(ps.calls(P1).contains(&Call::Rollback(id)));
    assert!(matches!(late, Err(Error::Txn(_))), "not active: {late:?}");
    assert_settled(&ps, id, false);
}

#[test]
fn an_answer_to_an_unknown_id_stands_against_a_late_enlistment() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let start = start_in(&c);
    let (aborted, nothing) = (TxnId::generate(), TxnId::generate());

    // p1's enlistments are still on their way when the client gives up and commits.
    let named = ["p1".to_string()];
    let commit = c.run(c.core.commit_named(aborted, Some(&named), Duration::ZERO));
    let empty = c.run(c.core.commit_named(nothing, Some(&[]), Duration::ZERO));
    let late = |id| {
        c.run(
            c.core
                .register(id, Some(&start), "p1", P1, "instance-1", false),
        )
    };
    let (late_aborted, late_nothing) = (late(aborted), late(nothing));
    let again = c.run(c.core.commit_named(aborted, Some(&named), Duration::ZERO));

    assert_eq!(commit.unwrap().outcome, Outcome::Aborted);
    assert_eq!(empty.unwrap().outcome, Outcome::Committed);
    assert!(
        matches!(late_aborted, Err(Error::Txn(_))),
        "{late_aborted:?}"
    );
    assert!(
        matches!(late_nothing, Err(Error::Txn(_))),
        "{late_nothing:?}"
    );
    assert_eq!(
        again.unwrap().outcome,
        Outcome::Aborted,
        "the answer stands"
    );
}

#[test]
fn commit_naming_a_branch_that_never_enlisted_aborts_the_others() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let start = start_in(&c);
    let id = started_on(&c, P1, &start).unwrap();

    let named = ["p1".to_string(), "p2".to_string()];
    let commit = c.run(c.core.commit_named(id, Some(&named), Duration::ZERO));

    assert_eq!(commit.unwrap().outcome, Outcome::Aborted);
    c.until_finished(id);
    assert!(!ps.calls(P1).contains(&Call::Prepare(id)), "never prepared");
    assert_settled(&ps, id, false);
}

#[test]
fn crash_while_prepare_is_in_flight_aborts_and_rolls_back_what_prepared() {
    let ps = participants();
    ps.set(P2, behave(OnPrepare::Hang, OnFinish::Ack));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);
    c.commit_in_background(id);
    c.until("p1 prepared", || ps.prepared(P1).contains(&id));
    assert_eq!(c.query(id), Outcome::Pending, "votes are still coming in");

    ps.set(P2, Behaviour::default());
    let c = Process::start(c.crash(), &ps);

    c.until_finished(id);
    assert_eq!(c.query(id), Outcome::Aborted);
    assert_settled(&ps, id, false);
    assert!(ps.rolled_back(P1, id));
}

#[test]
fn crash_when_every_vote_is_in_but_none_was_heard_aborts() {
    let ps = participants();
    ps.set(P1, behave(OnPrepare::LoseReply, OnFinish::Ack));
    ps.set(P2, behave(OnPrepare::LoseReply, OnFinish::Ack));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);
    c.commit_in_background(id);
    c.until("both prepared", || {
        ps.prepared(P1).contains(&id) && ps.prepared(P2).contains(&id)
    });

    let c = Process::start(c.crash(), &ps);

    c.until_finished(id);
    assert_settled(&ps, id, false);
    assert!(ps.rolled_back(P1, id) && ps.rolled_back(P2, id));
}

#[test]
fn crash_after_the_decision_is_written_but_not_flushed_aborts_and_nobody_was_told() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);
    c.log.stall_syncs();
    c.commit_in_background(id);
    c.until("the decision is written", || {
        c.log.get(id).unwrap().unwrap().state == State::Committing
    });

    // Decided, not durable: nobody may hear "committed" yet.
    assert_eq!(c.query(id), Outcome::Pending);
    assert_eq!(c.shown_state(id), proto::TxnState::Preparing);
    assert!(
        !ps.calls(P1).contains(&Call::Commit(id)),
        "no COMMIT PREPARED before the flush"
    );

    let c = Process::start(c.crash(), &ps);

    c.until_finished(id);
    assert_eq!(
        c.query(id),
        Outcome::Aborted,
        "the decision did not survive"
    );
    assert_settled(&ps, id, false);
}

#[test]
fn crash_after_the_decision_is_flushed_commits_everywhere() {
    let ps = participants();
    ps.set(P1, behave(OnPrepare::Yes, OnFinish::Hang));
    ps.set(P2, behave(OnPrepare::Yes, OnFinish::Hang));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);

    let answer = c.run(c.core.commit(id, Duration::from_millis(20))).unwrap();
    assert_eq!(answer.outcome, Outcome::Committed);
    assert!(answer.branches_pending, "phase 2 could not finish yet");

    ps.set(P1, Behaviour::default());
    ps.set(P2, Behaviour::default());
    let c = Process::start(c.crash(), &ps);

    assert_eq!(
        c.query(id),
        Outcome::Committed,
        "announced at once after restart"
    );
    assert_eq!(
        c.commit(id),
        Outcome::Committed,
        "a retried Commit hears the truth"
    );
    c.until_finished(id);
    assert_settled(&ps, id, true);
}

#[test]
fn crash_after_one_commit_is_acked_commits_the_other_and_repeats_the_first_harmlessly() {
    let ps = participants();
    ps.set(P2, behave(OnPrepare::Yes, OnFinish::Hang));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);
    c.commit_in_background(id);
    c.until("p1 committed", || ps.committed(P1, id));

    ps.set(P2, Behaviour::default());
    let c = Process::start(c.crash(), &ps);

    c.until_finished(id);
    assert_settled(&ps, id, true);
    let commits_to_p1 = ps
        .calls(P1)
        .iter()
        .filter(|c| **c == Call::Commit(id))
        .count();
    assert_eq!(commits_to_p1, 2, "re-driven to both: acks are not logged");
}

#[test]
fn crash_after_every_ack_but_before_the_final_record_retires_it_as_committed() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);
    assert_eq!(c.commit(id), Outcome::Committed);
    c.until_finished(id);
    assert_eq!(c.log.get(id).unwrap().unwrap().state, State::Committed);

    // The final record is a hint, never forced: the crash takes it.
    let c = Process::start(c.crash(), &ps);

    c.until_finished(id);
    assert_eq!(c.log.get(id).unwrap().unwrap().state, State::Committed);
    assert_settled(&ps, id, true);
}

// ---- Participants failing while the coordinator lives ----

#[test]
fn a_participant_down_in_phase_one_is_a_no() {
    let ps = participants();
    ps.set(
        P2,
        Behaviour {
            down: true,
            ..Behaviour::default()
        },
    );
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);

    assert_eq!(c.commit(id), Outcome::Aborted);

    ps.set(P2, Behaviour::default());
    c.until_finished(id);
    assert_settled(&ps, id, false);
}

#[test]
fn a_participant_down_in_phase_two_is_retried_until_it_is_back() {
    let ps = participants();
    // Both vote yes, then p2 goes away before its COMMIT PREPARED.
    ps.set(P2, behave(OnPrepare::Yes, OnFinish::Unreachable));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);
    let answer = c.run(c.core.commit(id, Duration::from_millis(20))).unwrap();
    assert!(answer.branches_pending);
    c.until("several retries", || {
        ps.calls(P2)
            .iter()
            .filter(|c| **c == Call::Commit(id))
            .count()
            >= 3
    });

    ps.set(P2, Behaviour::default());

    c.until_finished(id);
    assert_settled(&ps, id, true);
}

#[test]
fn a_rollback_whose_participant_stays_unreachable_is_left_to_presumed_abort() {
    let ps = participants();
    ps.set(P1, behave(OnPrepare::Yes, OnFinish::Unreachable));
    ps.set(P2, behave(OnPrepare::No, OnFinish::Ack));
    let limits = Limits {
        rollback_retry_for: Duration::from_millis(50),
        ..scenario_limits()
    };
    let c = Process::start_with(MemLog::default(), &ps, limits);
    let id = c.begin_with(&[P1, P2]);

    assert_eq!(c.commit(id), Outcome::Aborted);

    c.until_finished(id);
    let record = wire::transaction(&c.core.get(id).unwrap());
    assert_eq!(record.state(), proto::TxnState::Aborted);
    assert_eq!(
        record.branches[0].state(),
        proto::BranchState::Abandoned,
        "{record:?}"
    );
    assert_eq!(ps.prepared(P1), vec![id], "p1 was never reached");
    assert_eq!(c.query(id), Outcome::Aborted, "what p1's resolver hears");
    assert_eq!(c.log.prune(i64::MAX).unwrap(), 1, "pruned like any other");
    assert_eq!(c.query(id), Outcome::Aborted, "presumed abort, once pruned");

    ps.set(P1, Behaviour::default());
    c.run(c.core.resolve_orphans()).unwrap();
    assert_settled(&ps, id, false);
}

#[test]
fn a_restart_does_not_renew_the_rollback_retry_window() {
    let ps = participants();
    ps.set(P1, behave(OnPrepare::Yes, OnFinish::Unreachable));
    ps.set(P2, behave(OnPrepare::No, OnFinish::Ack));
    let limits = Limits {
        rollback_retry_for: Duration::from_millis(300),
        ..scenario_limits()
    };
    let c = Process::start_with(MemLog::default(), &ps, limits.clone());
    let id = c.begin_with(&[P1, P2]);
    assert_eq!(c.commit(id), Outcome::Aborted);
    c.run(c.core.sync());
    c.until("p1's rollback was tried", || {
        ps.calls(P1).contains(&Call::Rollback(id))
    });
    let log = c.crash();
    std::thread::sleep(Duration::from_millis(300));

    let rollbacks_before = rollbacks(&ps, P1, id);
    let c = Process::start_with(log, &ps, limits);

    c.until_finished(id);
    assert_eq!(
        wire::transaction(&c.core.get(id).unwrap()).state(),
        proto::TxnState::Aborted
    );
    assert_eq!(
        rollbacks(&ps, P1, id),
        rollbacks_before + 1,
        "one more try after the restart, then left to presumed abort"
    );
}

fn rollbacks(ps: &FakeParticipants, ep: &str, id: TxnId) -> usize {
    ps.calls(ep)
        .iter()
        .filter(|c| **c == Call::Rollback(id))
        .count()
}

#[test]
fn a_lost_commit_ack_is_retried_and_the_repeat_succeeds() {
    let ps = participants();
    ps.set(P1, behave(OnPrepare::Yes, OnFinish::LoseReply));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);
    c.commit_in_background(id);
    c.until("p1 committed without telling", || ps.committed(P1, id));

    ps.set(P1, Behaviour::default());

    c.until_finished(id);
    assert_settled(&ps, id, true);
}

#[test]
fn abort_during_phase_one_wins_over_yes_votes() {
    let ps = participants();
    ps.set(P2, behave(OnPrepare::LoseReply, OnFinish::Ack));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);
    c.commit_in_background(id);
    c.until("p2 prepared", || ps.prepared(P2).contains(&id));

    ps.set(P2, Behaviour::default());
    let outcome = c.run(c.core.abort(id, "client gave up")).unwrap();

    assert_eq!(outcome, Outcome::Aborted);
    c.until_finished(id);
    assert_settled(&ps, id, false);
}

// ---- Orphans: prepared branches no live transaction owns ----

#[test]
fn an_orphan_with_no_record_is_rolled_back() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    c.begin_with(&[P1]); // p1 is in the registry
    let orphan = TxnId::generate();
    ps.prepare_orphan(P1, orphan);

    let scan = c.run(c.core.resolve_orphans()).unwrap();

    assert_eq!(scan.rolled_back, 1);
    assert!(ps.rolled_back(P1, orphan));
    assert!(ps.prepared(P1).is_empty());
}

#[test]
fn an_orphan_whose_record_says_committed_is_committed() {
    let ps = participants();
    ps.set(P2, behave(OnPrepare::Yes, OnFinish::Hang));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1, P2]);
    assert_eq!(
        c.run(c.core.commit(id, Duration::ZERO)).unwrap().outcome,
        Outcome::Committed
    );
    c.until("p1 committed", || ps.committed(P1, id));
    // An operator retires it while p2 is away, declaring p2's branch finished...
    c.run(c.core.resolve(id, true, "ops", "p2 is gone"))
        .unwrap();
    assert_eq!(c.log.get(id).unwrap().unwrap().state, State::Committed);
    assert_eq!(
        ps.prepared(P2),
        vec![id],
        "...but p2 comes back still prepared"
    );
    ps.set(P2, Behaviour::default());

    let scan = c.run(c.core.resolve_orphans()).unwrap();

    assert_eq!(scan.committed, 1);
    assert_settled(&ps, id, true);
}

#[test]
fn an_operator_cannot_reverse_a_decision() {
    let ps = participants();
    ps.set(P1, behave(OnPrepare::Yes, OnFinish::Hang));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1]);
    c.run(c.core.commit(id, Duration::ZERO)).unwrap();

    let refused = c.run(c.core.resolve(id, false, "ops", "wrong button"));

    assert!(matches!(
        refused,
        Err(super::error::Error::Txn(
            super::txn::TxnError::CannotForce { .. }
        ))
    ));
    assert_eq!(c.query(id), Outcome::Committed);
}

// ---- One-phase commit of a lone branch (docs/PROTOCOL.md, its crash table) ----

fn one_phase(on: OnOnePhase) -> Behaviour {
    Behaviour {
        one_phase: on,
        ..Behaviour::default()
    }
}

fn one_phase_calls(ps: &FakeParticipants, ep: &str, id: TxnId) -> usize {
    ps.calls(ep)
        .iter()
        .filter(|c| matches!(c, Call::CommitOnePhase(t, _) if *t == id))
        .count()
}

#[test]
fn one_phase_commits_a_lone_branch_with_one_flush_and_no_prepare() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_one_phase(P1);
    let syncs_before = c.log.syncs();

    assert_eq!(c.commit(id), Outcome::Committed);

    c.until_finished(id);
    assert!(ps.committed(P1, id));
    assert!(!ps.calls(P1).contains(&Call::Prepare(id)), "no phase 1");
    assert_eq!(one_phase_calls(&ps, P1, id), 1);
    assert_eq!(
        c.log.syncs(),
        syncs_before + 1,
        "one forced write: the delegation"
    );
    assert_eq!(c.shown_state(id), proto::TxnState::Committed);
    assert_eq!(ps.alarms(), 0);
}

#[test]
fn one_phase_refused_by_the_participant_aborts_with_its_reason() {
    let ps = participants();
    ps.set(P1, one_phase(OnOnePhase::Refuse));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_one_phase(P1);

    assert_eq!(c.commit(id), Outcome::Aborted);

    let reason = wire::transaction(&c.core.get(id).unwrap()).reason;
    assert!(
        reason.contains("p1") && reason.contains("23503"),
        "{reason}"
    );
    assert!(!ps.committed(P1, id));
}

#[test]
fn one_phase_crash_after_the_record_is_written_but_not_flushed_aborts_and_sent_nothing() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_one_phase(P1);
    c.log.stall_syncs();
    c.commit_in_background(id);
    c.until("the delegation is written", || {
        c.log.get(id).unwrap().unwrap().state == State::OnePhase
    });
    assert_eq!(
        one_phase_calls(&ps, P1, id),
        0,
        "nothing sent before the flush"
    );
    assert_eq!(c.query(id), Outcome::Pending);

    let c = Process::start(c.crash(), &ps);

    c.until_finished(id);
    assert_eq!(
        c.query(id),
        Outcome::Aborted,
        "only the Active hint was durable"
    );
    assert!(ps.calls(P1).contains(&Call::Rollback(id)));
    assert!(!ps.committed(P1, id));
    assert_eq!(ps.alarms(), 0);
}

#[test]
fn one_phase_crash_after_the_flush_asks_the_participant_again_and_never_presumes_abort() {
    let ps = participants();
    ps.set(P1, one_phase(OnOnePhase::Hang));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_one_phase(P1);
    c.commit_in_background(id);
    c.until("CommitOnePhase is out", || {
        one_phase_calls(&ps, P1, id) == 1
    });

    ps.set(P1, one_phase(OnOnePhase::Commit));
    let c = Process::start(c.crash(), &ps);

    assert_eq!(
        c.commit(id),
        Outcome::Committed,
        "a retried Commit gets the participant's outcome"
    );
    c.until_finished(id);
    assert!(ps.committed(P1, id));
    assert_eq!(ps.alarms(), 0);
}

#[test]
fn one_phase_crash_after_the_participant_committed_but_its_reply_was_lost_commits() {
    let ps = participants();
    ps.set(P1, one_phase(OnOnePhase::LoseReply));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_one_phase(P1);
    c.commit_in_background(id);
    c.until("the participant committed", || ps.committed(P1, id));
    assert_eq!(
        c.query(id),
        Outcome::Pending,
        "the coordinator has not heard"
    );

    ps.set(P1, one_phase(OnOnePhase::Commit));
    let c = Process::start(c.crash(), &ps);

    c.until_finished(id);
    assert_eq!(c.query(id), Outcome::Committed, "answered from the marker");
    assert_eq!(c.commit(id), Outcome::Committed);
    assert_eq!(ps.alarms(), 0);
}

#[test]
fn one_phase_crash_when_the_participant_lost_the_branch_aborts() {
    let ps = participants();
    ps.set(P1, one_phase(OnOnePhase::Hang));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_one_phase(P1);
    c.commit_in_background(id);
    c.until("CommitOnePhase is out", || {
        one_phase_calls(&ps, P1, id) == 1
    });

    // The participant restarted meanwhile: the branch's statements are gone.
    ps.lose_branch(P1, id);
    ps.set(P1, one_phase(OnOnePhase::Commit));
    let c = Process::start(c.crash(), &ps);

    assert_eq!(c.commit(id), Outcome::Aborted);
    assert!(!ps.committed(P1, id));
}

#[test]
fn a_lost_one_phase_reply_is_asked_again_within_the_callers_wait() {
    let ps = participants();
    ps.set(P1, one_phase(OnOnePhase::LoseReply));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_one_phase(P1);
    c.spawn({
        let ps = ps.clone();
        async move {
            // Once it has committed, the next reply gets through.
            while !ps.committed(P1, id) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            ps.set(P1, one_phase(OnOnePhase::Commit));
        }
    });

    assert_eq!(c.commit(id), Outcome::Committed);
    assert_eq!(
        one_phase_calls(&ps, P1, id),
        2,
        "asked again, answered from the marker"
    );
}

#[test]
fn a_participant_that_does_not_answer_makes_commit_unavailable_until_it_does() {
    let ps = participants();
    ps.set(P1, one_phase(OnOnePhase::Unreachable));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_one_phase(P1);

    let first = c.run(c.core.commit(id, Duration::ZERO));
    let Err(e @ Error::OutcomeAtParticipant { .. }) = first else {
        panic!("expected OutcomeAtParticipant, got {first:?}");
    };
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("p1") && status.message().contains("call Commit again"),
        "{}",
        status.message()
    );
    assert_eq!(c.query(id), Outcome::Pending, "never a presumed abort");
    assert!(
        matches!(
            c.run(c.core.resolve(id, false, "op", "stuck")),
            Err(Error::Txn(_))
        ),
        "an operator cannot guess the participant's outcome either"
    );

    ps.set(P1, one_phase(OnOnePhase::Commit));
    assert_eq!(c.commit(id), Outcome::Committed);
}

#[test]
fn abort_cannot_overrule_a_one_phase_commit() {
    let ps = participants();
    ps.set(P1, one_phase(OnOnePhase::LoseReply));
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_one_phase(P1);
    c.commit_in_background(id);
    c.until("the participant committed", || ps.committed(P1, id));
    ps.set(P1, one_phase(OnOnePhase::Commit));

    assert_eq!(
        c.run(c.core.abort(id, "changed my mind")).unwrap(),
        Outcome::Committed
    );
}

#[test]
fn the_next_one_phase_commit_lets_the_participant_forget_the_last_marker() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let first = c.begin_one_phase(P1);
    assert_eq!(c.commit(first), Outcome::Committed);
    c.until_finished(first);
    assert_eq!(ps.markers(P1), vec![first]);

    let second = c.begin_one_phase(P1);
    assert_eq!(c.commit(second), Outcome::Committed);

    assert!(
        ps.calls(P1)
            .contains(&Call::CommitOnePhase(second, vec![first])),
        "its final record was durable by the second's flush"
    );
    assert_eq!(ps.markers(P1), vec![second]);
}

// ---- Distributed deadlocks ----

fn wait(waiter: TxnId, holder: TxnId) -> proto::LockWait {
    proto::LockWait {
        waiter_txn_id: waiter.to_string(),
        holder_txn_id: holder.to_string(),
        waited_ms: 500,
        lock: "transactionid (ShareLock)".into(),
        ..Default::default()
    }
}

/// Scenario limits with the detector driven by hand (`break_deadlocks`), every wait counted.
fn detecting() -> Limits {
    Limits {
        deadlock_interval: None,
        deadlock_min_wait: Duration::ZERO,
        ..scenario_limits()
    }
}

#[test]
fn a_cycle_across_participants_aborts_its_youngest_transaction_with_40p01() {
    let ps = participants();
    let c = Process::start_with(MemLog::default(), &ps, detecting());
    let older = c.begin_with(&[P1, P2]);
    let younger = c.begin_with(&[P1, P2]);
    ps.set_waits(P1, vec![wait(younger, older)]);
    ps.set_waits(P2, vec![wait(older, younger)]);

    let victims = c.run(c.core.break_deadlocks());

    assert_eq!(
        victims.iter().map(|v| v.txn).collect::<Vec<_>>(),
        vec![younger]
    );
    c.until_finished(younger);
    let record = wire::transaction(&c.core.get(younger).unwrap());
    assert_eq!(record.state(), proto::TxnState::Aborted);
    assert!(
        record.reason.contains("distributed deadlock"),
        "{}",
        record.reason
    );
    let (reason, sqlstate) = ps
        .abort_cause(P1, younger)
        .expect("a rollback with its cause");
    assert_eq!(sqlstate, "40P01");
    assert!(reason.contains(&older.to_string()), "{reason}");
    ps.set_waits(P1, vec![]);
    ps.set_waits(P2, vec![]);
    assert_eq!(c.commit(older), Outcome::Committed, "the survivor goes on");
}

#[test]
fn a_transaction_already_committing_is_never_a_deadlock_victim() {
    let ps = participants();
    let c = Process::start_with(MemLog::default(), &ps, detecting());
    let older = c.begin_with(&[P1, P2]);
    let younger = c.begin_with(&[P1, P2]);
    ps.set(P1, behave(OnPrepare::Hang, OnFinish::Ack));
    c.commit_in_background(younger);
    c.until("the younger is preparing", || {
        ps.calls(P1).contains(&Call::Prepare(younger))
    });
    ps.set_waits(P1, vec![wait(younger, older)]);
    ps.set_waits(P2, vec![wait(older, younger)]);

    let victims = c.run(c.core.break_deadlocks());

    assert_eq!(
        victims.iter().map(|v| v.txn).collect::<Vec<_>>(),
        vec![older]
    );
    assert!(
        !wire::transaction(&c.core.get(younger).unwrap())
            .reason
            .contains("deadlock")
    );
}

#[test]
fn waits_that_form_no_cycle_abort_nothing() {
    let ps = participants();
    let c = Process::start_with(MemLog::default(), &ps, detecting());
    let (a, b) = (c.begin_with(&[P1, P2]), c.begin_with(&[P1, P2]));
    ps.set_waits(P1, vec![wait(b, a)]);
    ps.set_waits(P2, vec![wait(b, a)]);

    assert!(c.run(c.core.break_deadlocks()).is_empty());
    assert_eq!(c.shown_state(a), proto::TxnState::Active);
    assert_eq!(c.shown_state(b), proto::TxnState::Active);
}

// ---- Limits ----

/// A coordinator with these limits on an empty log, and a runtime to drive it.
fn fresh_with(limits: Limits) -> (Core, tokio::runtime::Runtime) {
    let core =
        Coordinator::with_participants("c1".into(), MemLog::default(), participants(), limits)
            .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (core, runtime)
}

#[test]
fn begin_and_enlistment_beyond_their_limits_are_resource_exhausted() {
    let limits = Limits {
        max_live: 2,
        max_branches: 1,
        ..Limits::default()
    };
    let (core, runtime) = fresh_with(limits);
    let code = |e: Error| tonic::Status::from(e);

    let (first, third, again, second) = runtime.block_on(async {
        let (first, _) = core.begin(30_000, "a".into()).unwrap();
        core.begin(30_000, "b".into()).unwrap();
        let third = core.begin(30_000, "c".into()).unwrap_err();
        core.register_branch(first, "p1", P1, "i", false)
            .await
            .unwrap();
        let again = core.register_branch(first, "p1", P1, "i", false).await;
        let second = core.register_branch(first, "p2", P2, "i", false).await;
        (first, third, again, second.unwrap_err())
    });

    let (third, second) = (code(third), code(second));
    assert_eq!(third.code(), tonic::Code::ResourceExhausted);
    assert!(
        third.message().contains("--max-live-transactions 2"),
        "{third:?}"
    );
    assert!(again.is_ok(), "a repeat of an enlistment is no new branch");
    assert_eq!(second.code(), tonic::Code::ResourceExhausted);
    assert!(second.message().contains("--max-branches 1"), "{second:?}");
    assert_eq!(
        wire::transaction(&core.get(first).unwrap()).branches.len(),
        1
    );
}

#[test]
fn only_allowed_participants_at_their_own_endpoints_are_enlisted() {
    let limits = Limits {
        allowed_participants: Some([("p1".to_string(), P1.to_string())].into()),
        ..Limits::default()
    };
    let (core, runtime) = fresh_with(limits);

    let (allowed, stranger, elsewhere) = runtime.block_on(async {
        let (id, _) = core.begin(30_000, "a".into()).unwrap();
        (
            core.register_branch(id, "p1", P1, "i", false).await,
            core.register_branch(id, "p2", P2, "i", false).await,
            core.register_branch(id, "p1", "http://evil", "i", false)
                .await,
        )
    });

    assert!(allowed.is_ok(), "{allowed:?}");
    for refused in [stranger, elsewhere] {
        let status = tonic::Status::from(refused.unwrap_err());
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("--allowed-participants"));
    }
}

// ---- The registry of participants ----

#[test]
fn the_registry_shows_each_participants_instance_health_and_branches() {
    let ps = participants();
    // p2 never acknowledges phase 2: its branch of `decided` stays prepared.
    ps.set(P2, behave(OnPrepare::Yes, OnFinish::Hang));
    let c = Process::start(MemLog::default(), &ps);
    let decided = c.begin_with(&[P1, P2]);
    assert_eq!(c.commit(decided), Outcome::Committed);
    let _running = c.begin_with(&[P1]);
    ps.set(
        P1,
        Behaviour {
            down: true,
            ..Behaviour::default()
        },
    );

    c.run(c.core.check_participants());
    let listed = c.core.list_participants();

    let by_id = |id: &str| listed.iter().find(|p| p.participant_id == id).unwrap();
    let (p1, p2) = (by_id("p1"), by_id("p2"));
    assert_eq!(listed.len(), 2);
    assert_eq!(
        (p1.endpoint.as_str(), p1.instance_id.as_str()),
        (P1, "instance-1")
    );
    assert_eq!(p1.health(), proto::ParticipantHealth::Unreachable);
    assert!(p1.health_detail.contains("refused"), "{p1:?}");
    assert_eq!((p1.prepared_branches, p1.open_branches), (0, 1));
    assert_eq!(p2.health(), proto::ParticipantHealth::Serving);
    assert_eq!((p2.prepared_branches, p2.open_branches), (1, 0));
    assert!(p2.last_seen_unix_ms >= p1.last_seen_unix_ms && p1.last_seen_unix_ms > 0);
}

#[test]
fn a_restarted_coordinator_lists_its_participants_from_the_log_unseen_and_unchecked() {
    let ps = participants();
    let c = Process::start(MemLog::default(), &ps);
    let id = c.begin_with(&[P1]);
    c.commit(id);

    let c = Process::start(c.crash(), &ps);
    let listed = c.core.list_participants();

    assert_eq!(listed.len(), 1);
    let p1 = &listed[0];
    assert_eq!(
        (p1.participant_id.as_str(), p1.endpoint.as_str()),
        ("p1", P1)
    );
    assert_eq!(p1.health(), proto::ParticipantHealth::Unknown);
    assert_eq!((p1.last_seen_unix_ms, p1.instance_id.as_str()), (0, ""));
}
