//! The saga driver and its recovery, crash by crash (docs/SAGAS.md §5), with no network and no
//! PostgreSQL: a coordinator over a [`MemLog`] and [`FakeParticipants`], whose in-memory
//! barrier behaves as `participant/barrier.rs` does in PostgreSQL. Each test is a row of the
//! crash table or one of the rules around it; every one ends by checking what applied at the
//! participants: each action at most once, and a compensation only for an action that applied.

use super::error::Error;
use super::log::{Log, MemLog};
use super::participants::fake::{Applied, Behaviour, FakeParticipants};
use super::saga::{Intervention, SagaState, StepState};
use super::saga_plan::tests::step;
use super::scenarios::Process;
use crate::proto;
use std::time::Duration;

const P1: &str = "http://p1";
const P2: &str = "http://p2";

fn submit(
    steps: Vec<proto::SagaStepPlan>,
    on_exhausted: proto::OnExhausted,
) -> proto::SubmitSagaRequest {
    proto::SubmitSagaRequest {
        saga_id: "order-1".into(),
        steps,
        options: Some(proto::SagaOptions {
            step_timeout_ms: 200,
            attempts: 3,
            initial_backoff_ms: 1,
            max_backoff_ms: 5,
            on_exhausted: on_exhausted as i32,
        }),
    }
}

/// Three steps, one after another: a and c on P1, b on P2.
fn three_steps() -> proto::SubmitSagaRequest {
    submit(
        vec![step("a", P1, &[]), step("b", P2, &[]), step("c", P1, &[])],
        proto::OnExhausted::Compensate,
    )
}

fn action(step: &str) -> Applied {
    Applied {
        saga_id: "order-1".into(),
        step: step.into(),
        compensation: false,
    }
}

fn compensation(step: &str) -> Applied {
    Applied {
        compensation: true,
        ..action(step)
    }
}

fn down() -> Behaviour {
    Behaviour {
        down: true,
        ..Behaviour::default()
    }
}

impl Process {
    fn submit(&self, req: &proto::SubmitSagaRequest) -> Result<super::saga::Saga, Error> {
        self.run(self.core.submit_saga(req))
    }

    /// The saga once it has gone as far as it goes alone (at most 5 s).
    fn ended(&self, id: &str) -> super::saga::Saga {
        self.run(self.core.get_saga(id, Duration::from_secs(5)))
            .unwrap()
    }
}

#[test]
fn an_in_order_saga_runs_each_action_once_in_order_and_completes() {
    let ps = FakeParticipants::default();
    let p = Process::start(MemLog::default(), &ps);
    let submitted = p.submit(&three_steps()).unwrap();
    assert_eq!(submitted.state, SagaState::Running);
    let saga = p.ended("order-1");
    assert_eq!(saga.state, SagaState::Completed, "{}", saga.reason);
    assert_eq!(ps.applied(P1), [action("a"), action("c")]);
    assert_eq!(ps.applied(P2), [action("b")]);
    assert!(
        saga.steps.iter().all(|s| s.output.is_some()),
        "outputs kept"
    );
    assert!(saga.finished_ms >= saga.created_ms && saga.created_ms > 0);
    // Final: it left memory; the log answers for it.
    p.until("the saga leaves memory", || {
        p.core.sagas.lock().unwrap().is_empty()
    });
    assert_eq!(
        p.log.get_saga("order-1").unwrap().unwrap().state,
        SagaState::Completed
    );
}

#[test]
fn a_dag_saga_joins_its_branches_and_completes() {
    let ps = FakeParticipants::default();
    let p = Process::start(MemLog::default(), &ps);
    let req = submit(
        vec![
            step("user", P1, &[]),
            step("inventory", P2, &["user"]),
            step("order", P1, &["user"]),
            step("payment", P2, &["inventory", "order"]),
        ],
        proto::OnExhausted::Compensate,
    );
    p.submit(&req).unwrap();
    let saga = p.ended("order-1");
    assert_eq!(saga.state, SagaState::Completed, "{}", saga.reason);
    assert_eq!(ps.applied(P1), [action("user"), action("order")]);
    assert_eq!(ps.applied(P2), [action("inventory"), action("payment")]);
}

#[test]
fn a_failing_step_compensates_exactly_the_steps_that_ran_in_reverse() {
    let ps = FakeParticipants::default();
    ps.fail_step(P1, "c");
    let p = Process::start(MemLog::default(), &ps);
    p.submit(&three_steps()).unwrap();
    let saga = p.ended("order-1");
    assert_eq!(saga.state, SagaState::Compensated);
    assert!(saga.reason.contains("SQLSTATE 23514"), "{}", saga.reason);
    // c's compensation was null (its action never applied): nothing ran for it.
    assert_eq!(ps.applied(P1), [action("a"), compensation("a")]);
    assert_eq!(ps.applied(P2), [action("b"), compensation("b")]);
    assert_eq!(saga.steps[2].state, StepState::Compensated);
}

#[test]
fn the_same_plan_again_is_the_same_saga_and_another_plan_is_refused() {
    let ps = FakeParticipants::default();
    let p = Process::start(MemLog::default(), &ps);
    p.submit(&three_steps()).unwrap();
    p.ended("order-1");
    let again = p.submit(&three_steps()).unwrap();
    assert_eq!(again.state, SagaState::Completed, "answered, not run again");
    assert_eq!(ps.applied(P1).len(), 2);
    let mut other = three_steps();
    other.steps.pop();
    assert!(matches!(p.submit(&other), Err(Error::SagaConflict(_))));
}

#[test]
fn a_crash_before_the_plan_is_durable_leaves_nothing_and_a_retry_runs_it() {
    let ps = FakeParticipants::default();
    let p = Process::start(MemLog::default(), &ps);
    p.log.stall_syncs();
    let core = std::sync::Arc::clone(&p.core);
    let req = three_steps();
    p.run(async {
        let submit = core.submit_saga(&req);
        // The flush never completes: SubmitSaga never answers, and no step is sent.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), submit)
                .await
                .is_err()
        );
    });
    assert!(
        ps.applied(P1).is_empty(),
        "no step before the plan is durable"
    );
    let p = Process::start(p.crash(), &ps);
    assert!(matches!(
        p.run(p.core.get_saga("order-1", Duration::ZERO)),
        Err(Error::SagaNotFound(_))
    ));
    p.submit(&three_steps()).unwrap();
    assert_eq!(p.ended("order-1").state, SagaState::Completed);
}

#[test]
fn a_crash_after_an_action_applied_sends_it_again_and_the_barrier_runs_it_once() {
    let ps = FakeParticipants::default();
    ps.set(P2, down());
    let p = Process::start(MemLog::default(), &ps);
    p.submit(&three_steps()).unwrap();
    p.until("a applied", || ps.applied(P1) == [action("a")]);
    // Only the plan is durable: a's success was a hint, lost with the process.
    let p = Process::start(p.crash(), &ps);
    ps.set(P2, Behaviour::default());
    let saga = p.ended("order-1");
    assert_eq!(saga.state, SagaState::Completed, "{}", saga.reason);
    assert_eq!(ps.applied(P1), [action("a"), action("c")], "a once");
    assert_eq!(ps.applied(P2), [action("b")]);
}

#[test]
fn a_crash_mid_compensation_resumes_compensating_and_compensates_each_step_once() {
    let ps = FakeParticipants::default();
    ps.fail_step(P1, "c");
    ps.set_compensations_down(P2, true);
    let p = Process::start(MemLog::default(), &ps);
    p.submit(&three_steps()).unwrap();
    // c's failure is durable before any compensation is sent; b's cannot apply yet.
    p.until(
        "c failed, durably, and b's compensation is being retried",
        || {
            p.log
                .crash()
                .get_saga("order-1")
                .unwrap()
                .is_some_and(|s| s.state == SagaState::Compensating)
                && p.core.sagas.lock().unwrap()["order-1"].snapshot().steps[1].compensations > 0
        },
    );
    let p = Process::start(p.crash(), &ps);
    ps.set_compensations_down(P2, false);
    let saga = p.ended("order-1");
    assert_eq!(saga.state, SagaState::Compensated, "{}", saga.reason);
    assert_eq!(ps.applied(P1), [action("a"), compensation("a")]);
    assert_eq!(ps.applied(P2), [action("b"), compensation("b")]);
}

#[test]
fn a_step_out_of_attempts_under_stop_leaves_the_saga_stuck_for_an_operator() {
    let ps = FakeParticipants::default();
    ps.set(P2, down());
    let p = Process::start(MemLog::default(), &ps);
    let req = submit(
        vec![step("a", P1, &[]), step("b", P2, &[])],
        proto::OnExhausted::Stop,
    );
    p.submit(&req).unwrap();
    let saga = p.ended("order-1");
    assert_eq!(saga.state, SagaState::Stuck);
    assert_eq!(saga.steps[1].state, StepState::Exhausted);
    assert_eq!(saga.steps[1].attempts, 3);
    assert!(
        saga.reason.contains("connection refused"),
        "{}",
        saga.reason
    );
    assert_eq!(ps.applied(P1), [action("a")], "nothing compensated");
    // The stop is durable: a restarted coordinator does not run it on.
    let p = Process::start(p.crash(), &ps);
    ps.set(P2, Behaviour::default());
    assert_eq!(p.ended("order-1").state, SagaState::Stuck);
    assert!(ps.applied(P2).is_empty());
}

#[test]
fn a_step_out_of_attempts_under_compensate_undoes_what_ran() {
    let ps = FakeParticipants::default();
    ps.set(P2, down());
    let p = Process::start(MemLog::default(), &ps);
    let req = submit(
        vec![step("a", P1, &[]), step("b", P2, &[])],
        proto::OnExhausted::Compensate,
    );
    p.submit(&req).unwrap();
    // b's compensation (it may have applied) waits for P2 to come back.
    p.until("b exhausted", || {
        p.core.sagas.lock().unwrap()["order-1"].snapshot().state == SagaState::Compensating
    });
    ps.set(P2, Behaviour::default());
    let saga = p.ended("order-1");
    assert_eq!(saga.state, SagaState::Compensated, "{}", saga.reason);
    assert_eq!(ps.applied(P1), [action("a"), compensation("a")]);
    assert!(
        ps.applied(P2).is_empty(),
        "b never applied: its compensation was null"
    );
}

#[test]
fn list_sagas_shows_live_and_logged_sagas_filtered_by_state() {
    let ps = FakeParticipants::default();
    let p = Process::start(MemLog::default(), &ps);
    p.submit(&three_steps()).unwrap();
    p.ended("order-1");
    ps.set(P2, down());
    let mut stuck = submit(vec![step("x", P2, &[])], proto::OnExhausted::Stop);
    stuck.saga_id = "order-2".into();
    p.submit(&stuck).unwrap();
    p.ended("order-2");
    let all = p.core.list_sagas(&[], 10).unwrap();
    assert_eq!(all.len(), 2);
    let only = p.core.list_sagas(&[SagaState::Stuck], 10).unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].id, "order-2");
}

/// A saga stopped at b (P2 down, out of attempts under STOP), a applied.
fn stopped(ps: &FakeParticipants) -> Process {
    ps.set(P2, down());
    let p = Process::start(MemLog::default(), ps);
    let req = submit(
        vec![step("a", P1, &[]), step("b", P2, &[])],
        proto::OnExhausted::Stop,
    );
    p.submit(&req).unwrap();
    assert_eq!(p.ended("order-1").state, SagaState::Stuck);
    p
}

impl Process {
    fn resolve(&self, what: Intervention) -> Result<super::saga::Saga, Error> {
        self.run(self.core.resolve_saga("order-1", what, "alice", "test"))
    }
}

#[test]
fn an_operator_retry_runs_a_stopped_step_again_and_the_saga_completes() {
    let ps = FakeParticipants::default();
    let p = stopped(&ps);
    ps.set(P2, Behaviour::default());
    let after = p.resolve(Intervention::Retry).unwrap();
    assert_eq!(after.state, SagaState::Running);
    assert_eq!(p.ended("order-1").state, SagaState::Completed);
    assert_eq!(ps.applied(P2), [action("b")]);
    assert!(
        matches!(p.resolve(Intervention::Retry), Err(Error::SagaConflict(_))),
        "a final saga has nothing left to decide"
    );
}

#[test]
fn an_operator_compensate_undoes_a_stopped_saga_and_survives_a_crash() {
    let ps = FakeParticipants::default();
    let p = stopped(&ps);
    ps.set_compensations_down(P1, true);
    p.resolve(Intervention::Compensate).unwrap();
    // The decision is durable: a restarted coordinator goes on compensating.
    let p = Process::start(p.crash(), &ps);
    ps.set(P2, Behaviour::default());
    ps.set_compensations_down(P1, false);
    assert_eq!(p.ended("order-1").state, SagaState::Compensated);
    assert_eq!(ps.applied(P1), [action("a"), compensation("a")]);
    assert!(
        ps.applied(P2).is_empty(),
        "b never applied: its compensation was null"
    );
}

#[test]
fn an_operator_skip_of_a_compensation_that_keeps_failing_finishes_the_saga() {
    let ps = FakeParticipants::default();
    ps.fail_step(P2, "b");
    ps.set_compensations_down(P1, true);
    let p = Process::start(MemLog::default(), &ps);
    p.submit(&submit(
        vec![step("a", P1, &[]), step("b", P2, &[])],
        proto::OnExhausted::Compensate,
    ))
    .unwrap();
    p.until("a's compensation has failed its attempts", || {
        p.core.sagas.lock().unwrap()["order-1"].snapshot().state == SagaState::Stuck
    });
    let after = p.resolve(Intervention::Skip).unwrap();
    assert_eq!(after.state, SagaState::Compensated);
    assert_eq!(p.ended("order-1").state, SagaState::Compensated);
    p.until("the saga leaves memory", || {
        p.core.sagas.lock().unwrap().is_empty()
    });
    assert_eq!(
        ps.applied(P1),
        [action("a")],
        "skipped: the operator undid a by hand"
    );
}

/// A step that calls a method of the user's service at `endpoint` (a gRPC step).
fn grpc_step(name: &str, endpoint: &str) -> proto::SagaStepPlan {
    let call = |method: &str| proto::SagaCall {
        call: Some(proto::saga_call::Call::Grpc(proto::GrpcCall {
            endpoint: endpoint.into(),
            method: method.into(),
            request: b"charge 42".to_vec(),
        })),
    };
    proto::SagaStepPlan {
        name: name.into(),
        action: Some(call("/payments.v1.Payments/Charge")),
        compensation: Some(call("/payments.v1.Payments/Refund")),
        depends_on: vec![],
    }
}

#[test]
fn a_grpc_step_sent_again_after_a_crash_applies_once_and_is_undone_when_a_later_step_fails() {
    const PAY: &str = "http://payments";
    let ps = FakeParticipants::default();
    ps.set(P2, down());
    ps.fail_step(P2, "order");
    let p = Process::start(MemLog::default(), &ps);
    p.submit(&submit(
        vec![grpc_step("pay", PAY), step("order", P2, &[])],
        proto::OnExhausted::Compensate,
    ))
    .unwrap();
    p.until("the charge applied", || ps.applied(PAY) == [action("pay")]);
    let p = Process::start(p.crash(), &ps);
    ps.set(P2, Behaviour::default());
    let saga = p.ended("order-1");
    assert_eq!(saga.state, SagaState::Compensated, "{}", saga.reason);
    assert_eq!(
        ps.applied(PAY),
        [action("pay"), compensation("pay")],
        "charged once, refunded once"
    );
    assert_eq!(
        saga.steps[0].output.as_deref(),
        Some(&b"charge 42"[..]),
        "the reply is the output"
    );
}

#[test]
fn retention_forgets_a_final_sagas_barrier_rows_then_its_record_and_waits_for_a_participant_that_is_down()
 {
    let ps = FakeParticipants::default();
    let p = Process::start(MemLog::default(), &ps);
    p.submit(&three_steps()).unwrap();
    p.ended("order-1");
    p.until("the saga leaves memory", || {
        p.core.sagas.lock().unwrap().is_empty()
    });
    assert_eq!((ps.barrier_rows(P1), ps.barrier_rows(P2)), (2, 1));
    let later = super::transactions::now_ms() + 1_000;
    let earlier = super::transactions::now_ms() - 60_000;
    assert_eq!(
        p.run(p.core.prune_sagas(earlier)).unwrap(),
        0,
        "finished after the cut-off"
    );
    assert!(p.log.get_saga("order-1").unwrap().is_some());

    ps.set(P2, down());
    assert_eq!(
        p.run(p.core.prune_sagas(later)).unwrap(),
        0,
        "P2 cannot forget yet"
    );
    assert!(p.log.get_saga("order-1").unwrap().is_some());
    ps.set(P2, Behaviour::default());
    assert_eq!(p.run(p.core.prune_sagas(later)).unwrap(), 1);

    assert_eq!((ps.barrier_rows(P1), ps.barrier_rows(P2)), (0, 0));
    assert!(matches!(
        p.run(p.core.get_saga("order-1", Duration::ZERO)),
        Err(Error::SagaNotFound(_))
    ));
}
