//! One saga as the coordinator sees it: a state machine that does no I/O (docs/SAGAS.md §2).
//!
//! ```text
//!                 every step Succeeded
//!  Running ───────────────────────────────────────────────▶ Completed
//!    │ a step Failed, or Exhausted under COMPENSATE
//!    ▼                 every started step compensated
//!  Compensating ──────────────────────────────────────────▶ Compensated
//!    │ a compensation out of attempts        ▲
//!    ▼                                        │ an operator: retry, skip
//!  Stuck ◀── a step Exhausted under STOP ─────┘
//! ```
//!
//! The driver asks [`Saga::next`] what to send, sends it, and feeds each answer back
//! ([`Saga::action_result`], [`Saga::compensation_result`]); it never assigns a state. Which
//! writes must be flushed before the driver goes on is the machine's word too
//! ([`Recorded::flush`]): the plan, and a step's failure before its first compensation. Every
//! other record is a hint, because the barrier (docs/SAGAS.md §4) answers a repeated action with
//! its first run's output and makes a repeated compensation a no-op.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A step, by its place in the plan.
pub type StepId = usize;

/// Why a plan is refused (INVALID_ARGUMENT).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("a saga needs at least one step")]
    NoSteps,
    #[error("step {0:?} is named twice; step names are unique in a saga")]
    DuplicateName(String),
    #[error("step {step:?} depends on {on:?}, which is no step of this saga")]
    UnknownDependency { step: String, on: String },
    #[error("the steps' depends_on form a cycle through {0:?}: a saga is a DAG")]
    Cycle(String),
    #[error("at most {max} attempts a step; {given} asked")]
    Attempts { given: u32, max: u32 },
}

/// The most attempts a plan may give a step (each with backoff up to its ceiling).
pub const MAX_ATTEMPTS: u32 = 1000;

/// What to do when a step's action runs out of attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnExhausted {
    /// Compensate every step that started (the default).
    #[default]
    Compensate,
    /// Stop as Stuck, for an operator.
    Stop,
}

/// Where a saga is. Stored in the log, so the names are its format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SagaState {
    Running,
    Completed,
    Compensating,
    Compensated,
    /// Waiting for an operator: a step out of attempts under STOP, or a compensation out of
    /// attempts (it is still retried, at the backoff's ceiling).
    Stuck,
}

impl SagaState {
    pub fn is_final(self) -> bool {
        matches!(self, SagaState::Completed | SagaState::Compensated)
    }
}

/// Where one step is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepState {
    /// Not sent.
    Pending,
    /// Sent by this process; its answer is awaited.
    Running,
    /// Sent before a restart, its answer lost: it may or may not have applied.
    Unknown,
    Succeeded,
    /// The step answered that it failed: nothing of it applied (its compensation, if sent, is
    /// null at the barrier).
    Failed,
    /// Out of attempts without an answer that counts: it may or may not have applied.
    Exhausted,
    /// Its compensation was sent and its answer is awaited.
    Compensating,
    /// Its compensation failed, or its answer was lost in a restart: it is sent again.
    Uncompensated,
    Compensated,
}

/// One step's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    /// The steps that must succeed before this one starts.
    pub depends_on: Vec<StepId>,
    pub state: StepState,
    /// Times its action was sent.
    pub attempts: u32,
    /// Times its compensation was sent.
    pub compensations: u32,
    pub last_error: String,
    /// The action's output, for its compensation and the steps that depend on it.
    pub output: Option<Vec<u8>>,
    /// When the action finished, in the saga's order of completions: compensations run from the
    /// latest back.
    pub finished_seq: Option<u64>,
}

/// What a step's action answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionResult {
    Succeeded(Vec<u8>),
    /// Do not retry; compensate.
    Failed(String),
    /// A transport error, a timeout, or the step asked to be retried later.
    RetryLater(String),
}

/// What the driver sends next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    Action(StepId),
    Compensation(StepId),
}

/// What a transition asks of the log: the saga's record is written; with `flush`, durably
/// before the driver sends anything more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Recorded {
    pub flush: bool,
}

/// What an operator asks of a stuck saga (docs/SAGAS.md §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intervention {
    /// The stuck step again, its attempts counted afresh: its action (stopped under STOP), or
    /// its compensation.
    Retry,
    /// Count the stuck step as done: its action as succeeded (the operator made sure it
    /// applied, or that it need not), or its compensation as applied.
    Skip,
    /// Compensate a saga stopped under STOP after all.
    Compensate,
}

/// Why an intervention is refused (FAILED_PRECONDITION).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InterventionError {
    #[error("saga {id:?} is {state:?}, not stuck: only a stuck saga waits for an operator")]
    NotStuck { id: String, state: SagaState },
    #[error("saga {0:?} is stuck compensating: retry or skip its stuck compensation")]
    AlreadyCompensating(String),
}

/// A saga: its steps and where each is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    pub id: String,
    pub steps: Vec<Step>,
    pub state: SagaState,
    pub attempts_max: u32,
    pub on_exhausted: OnExhausted,
    /// Completions so far (for [`Step::finished_seq`]).
    completions: u64,
    /// Why it compensates or is stuck.
    pub reason: String,
    /// The plan as submitted (`twopc.v1.SubmitSagaRequest`, encoded): what each step sends,
    /// which the machine never reads; a repeated submit is compared with it.
    #[serde(default)]
    pub plan: Vec<u8>,
    #[serde(default)]
    pub created_ms: i64,
    /// When it became final; 0 until then.
    #[serde(default)]
    pub finished_ms: i64,
}

impl Saga {
    /// A saga of `steps` (each a name and the names it depends on), validated as a DAG; with no
    /// dependency anywhere, each step depends on the one before (the steps run in order).
    pub fn new(
        id: &str,
        steps: &[(&str, Vec<&str>)],
        attempts_max: u32,
        on_exhausted: OnExhausted,
    ) -> Result<Saga, PlanError> {
        if steps.is_empty() {
            return Err(PlanError::NoSteps);
        }
        if attempts_max > MAX_ATTEMPTS {
            return Err(PlanError::Attempts {
                given: attempts_max,
                max: MAX_ATTEMPTS,
            });
        }
        let mut index = HashMap::new();
        for (i, (name, _)) in steps.iter().enumerate() {
            if index.insert(*name, i).is_some() {
                return Err(PlanError::DuplicateName(name.to_string()));
            }
        }
        let in_order = steps.iter().all(|(_, deps)| deps.is_empty());
        let mut built = Vec::with_capacity(steps.len());
        for (i, (name, deps)) in steps.iter().enumerate() {
            let depends_on = match in_order {
                true => (i > 0).then(|| i - 1).into_iter().collect(),
                false => deps
                    .iter()
                    .map(|d| {
                        index
                            .get(d)
                            .copied()
                            .ok_or_else(|| PlanError::UnknownDependency {
                                step: name.to_string(),
                                on: d.to_string(),
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            built.push(Step {
                name: name.to_string(),
                depends_on,
                state: StepState::Pending,
                attempts: 0,
                compensations: 0,
                last_error: String::new(),
                output: None,
                finished_seq: None,
            });
        }
        let saga = Saga {
            id: id.to_string(),
            steps: built,
            state: SagaState::Running,
            attempts_max: attempts_max.max(1),
            on_exhausted,
            completions: 0,
            reason: String::new(),
            plan: Vec::new(),
            created_ms: 0,
            finished_ms: 0,
        };
        saga.check_acyclic()?;
        Ok(saga)
    }

    fn check_acyclic(&self) -> Result<(), PlanError> {
        // Kahn's algorithm: a step whose dependencies are all placed is placed.
        let mut placed = vec![false; self.steps.len()];
        let mut left = self.steps.len();
        while left > 0 {
            let ready: Vec<StepId> = (0..self.steps.len())
                .filter(|&i| !placed[i] && self.steps[i].depends_on.iter().all(|&d| placed[d]))
                .collect();
            if ready.is_empty() {
                let stuck = (0..self.steps.len()).find(|&i| !placed[i]).unwrap_or(0);
                return Err(PlanError::Cycle(self.steps[stuck].name.clone()));
            }
            for i in ready {
                placed[i] = true;
                left -= 1;
            }
        }
        Ok(())
    }

    /// What was submitted is durable before any step is sent.
    pub fn submitted(&self) -> Recorded {
        Recorded { flush: true }
    }

    /// After a restart: steps that were in flight have lost their answers.
    pub fn recovered(&mut self) {
        for step in &mut self.steps {
            step.state = match step.state {
                StepState::Running => StepState::Unknown,
                // Its compensation's answer is lost: send it again (the barrier makes a
                // repeat a no-op).
                StepState::Compensating => StepState::Uncompensated,
                ref s => s.clone(),
            };
        }
    }

    /// The steps whose dependencies' outputs it takes, by step name.
    pub fn inputs(&self, step: StepId) -> Vec<(&str, &[u8])> {
        self.steps[step]
            .depends_on
            .iter()
            .filter_map(|&d| {
                let s = &self.steps[d];
                s.output.as_deref().map(|o| (s.name.as_str(), o))
            })
            .collect()
    }

    /// What to send now (nothing while the saga waits for answers, or is final or stuck).
    pub fn next(&self) -> Vec<Work> {
        match self.state {
            SagaState::Running => (0..self.steps.len())
                .filter(|&i| {
                    matches!(self.steps[i].state, StepState::Pending | StepState::Unknown)
                        && self.steps[i]
                            .depends_on
                            .iter()
                            .all(|&d| self.steps[d].state == StepState::Succeeded)
                })
                .map(Work::Action)
                .collect(),
            SagaState::Compensating => self.compensable(),
            // Stuck in its compensations: they go on being retried. Stopped before any (STOP):
            // nothing moves until an operator says.
            SagaState::Stuck if self.steps.iter().any(|s| s.compensations > 0) => {
                self.compensable()
            }
            SagaState::Stuck => Vec::new(),
            SagaState::Completed | SagaState::Compensated => Vec::new(),
        }
    }

    /// Steps whose compensation may go now: started (so it may have applied), not yet
    /// compensated, no action of it in flight, and every started step that depends on it
    /// compensated first; of those, the latest finished first.
    fn compensable(&self) -> Vec<Work> {
        let needs = |s: &Step| {
            matches!(
                s.state,
                StepState::Succeeded
                    | StepState::Failed
                    | StepState::Exhausted
                    | StepState::Unknown
                    | StepState::Uncompensated
            )
        };
        let settled = |s: &Step| matches!(s.state, StepState::Pending | StepState::Compensated);
        let mut ready: Vec<StepId> = (0..self.steps.len())
            .filter(|&i| needs(&self.steps[i]))
            .filter(|&i| {
                self.steps
                    .iter()
                    .filter(|s| s.depends_on.contains(&i))
                    .all(settled)
            })
            .collect();
        if self.steps.iter().any(|s| s.state == StepState::Running) {
            // An action still in flight: its answer comes first, so its compensation knows
            // whether it ran. Compensations that do not wait on it go now.
            ready.retain(|&i| {
                !self
                    .steps
                    .iter()
                    .any(|s| s.state == StepState::Running && s.depends_on.contains(&i))
            });
        }
        ready.sort_by_key(|&i| std::cmp::Reverse(self.steps[i].finished_seq.unwrap_or(u64::MAX)));
        ready.into_iter().map(Work::Compensation).collect()
    }

    /// The driver sends `work` now.
    pub fn sent(&mut self, work: Work) -> Recorded {
        let step = match work {
            Work::Action(i) | Work::Compensation(i) => &mut self.steps[i],
        };
        match work {
            Work::Action(_) => {
                step.attempts += 1;
                step.state = StepState::Running;
            }
            Work::Compensation(_) => {
                step.compensations += 1;
                step.state = StepState::Compensating;
            }
        }
        Recorded { flush: false }
    }

    /// Whether `step`'s action may be sent again after an answer that does not count.
    fn retries_left(&self, step: StepId) -> bool {
        self.steps[step].attempts < self.attempts_max
    }

    /// An action's answer.
    pub fn action_result(&mut self, step: StepId, result: ActionResult) -> Recorded {
        if self.steps[step].state != StepState::Running {
            // A late answer to a step already settled (compensated meanwhile): ignored.
            return Recorded { flush: false };
        }
        match result {
            ActionResult::Succeeded(output) => {
                self.completions += 1;
                let s = &mut self.steps[step];
                s.state = StepState::Succeeded;
                s.output = Some(output);
                s.finished_seq = Some(self.completions);
                s.last_error.clear();
                if self.state == SagaState::Running
                    && self.steps.iter().all(|s| s.state == StepState::Succeeded)
                {
                    self.state = SagaState::Completed;
                }
                Recorded { flush: false }
            }
            ActionResult::Failed(reason) => {
                self.finish_action(step, StepState::Failed, &reason);
                self.begin_compensating(format!(
                    "step {:?} failed: {reason}",
                    self.steps[step].name
                ));
                Recorded { flush: true }
            }
            ActionResult::RetryLater(error) => {
                if self.retries_left(step) {
                    let s = &mut self.steps[step];
                    s.state = StepState::Unknown;
                    s.last_error = error;
                    return Recorded { flush: false };
                }
                self.finish_action(step, StepState::Exhausted, &error);
                let reason = format!(
                    "step {:?} out of its {} attempts: {error}",
                    self.steps[step].name, self.attempts_max
                );
                match self.on_exhausted {
                    OnExhausted::Compensate => self.begin_compensating(reason),
                    OnExhausted::Stop => {
                        self.state = SagaState::Stuck;
                        self.reason = reason;
                    }
                }
                Recorded { flush: true }
            }
        }
    }

    fn finish_action(&mut self, step: StepId, state: StepState, error: &str) {
        self.completions += 1;
        let s = &mut self.steps[step];
        s.state = state;
        s.last_error = error.to_string();
        s.finished_seq = Some(self.completions);
    }

    fn begin_compensating(&mut self, reason: String) {
        if self.state == SagaState::Running {
            self.state = SagaState::Compensating;
            self.reason = reason;
        }
    }

    /// An operator's decision on a stuck saga. Durable before it is acted on: the driver sends
    /// whatever [`Saga::next`] says afterwards.
    pub fn intervene(&mut self, what: Intervention) -> Result<Recorded, InterventionError> {
        if self.state != SagaState::Stuck {
            return Err(InterventionError::NotStuck {
                id: self.id.clone(),
                state: self.state,
            });
        }
        // Stopped before any compensation (an action out of attempts under STOP), or stuck in
        // its compensations.
        let stopped = self.steps.iter().all(|s| s.compensations == 0);
        match (what, stopped) {
            (Intervention::Retry, true) => {
                for s in &mut self.steps {
                    if s.state == StepState::Exhausted {
                        s.state = StepState::Unknown;
                        s.attempts = 0;
                        s.finished_seq = None;
                    }
                }
                self.state = SagaState::Running;
            }
            (Intervention::Retry, false) => {
                for s in &mut self.steps {
                    if matches!(s.state, StepState::Uncompensated | StepState::Compensating) {
                        s.compensations = 0;
                    }
                }
                self.state = SagaState::Compensating;
            }
            (Intervention::Skip, true) => {
                for s in &mut self.steps {
                    if s.state == StepState::Exhausted {
                        s.state = StepState::Succeeded;
                    }
                }
                self.state = match self.steps.iter().all(|s| s.state == StepState::Succeeded) {
                    true => SagaState::Completed,
                    false => SagaState::Running,
                };
            }
            (Intervention::Skip, false) => {
                // One in flight too: its late answer is then ignored.
                for s in &mut self.steps {
                    if matches!(s.state, StepState::Uncompensated | StepState::Compensating) {
                        s.state = StepState::Compensated;
                    }
                }
                let done = self
                    .steps
                    .iter()
                    .filter(|s| s.state != StepState::Pending)
                    .all(|s| s.state == StepState::Compensated);
                self.state = match done {
                    true => SagaState::Compensated,
                    false => SagaState::Compensating,
                };
            }
            (Intervention::Compensate, true) => self.state = SagaState::Compensating,
            (Intervention::Compensate, false) => {
                return Err(InterventionError::AlreadyCompensating(self.id.clone()));
            }
        }
        Ok(Recorded { flush: true })
    }

    /// A compensation's answer: `Ok` it is applied (or null), `Err` it is to be retried.
    pub fn compensation_result(&mut self, step: StepId, result: Result<(), String>) -> Recorded {
        if self.steps[step].state != StepState::Compensating {
            return Recorded { flush: false };
        }
        match result {
            Ok(()) => {
                let s = &mut self.steps[step];
                s.state = StepState::Compensated;
                s.last_error.clear();
                let started = |s: &Step| s.state != StepState::Pending;
                if self
                    .steps
                    .iter()
                    .filter(|s| started(s))
                    .all(|s| s.state == StepState::Compensated)
                {
                    self.state = SagaState::Compensated;
                }
            }
            Err(error) => {
                let attempts_max = self.attempts_max;
                let s = &mut self.steps[step];
                // Sent again (a compensation never fails for good); the saga is Stuck for an
                // operator to see once it has used its attempts.
                s.state = StepState::Uncompensated;
                s.last_error = error.clone();
                if s.compensations >= attempts_max && self.state != SagaState::Stuck {
                    self.state = SagaState::Stuck;
                    self.reason = format!(
                        "the compensation of step {:?} failed {} times: {error}",
                        s.name, s.compensations
                    );
                }
            }
        }
        Recorded { flush: false }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A two-step saga, for tests of where sagas are kept.
    pub(crate) fn saga(id: &str) -> Saga {
        Saga::new(
            id,
            &[("a", vec![]), ("b", vec![])],
            3,
            OnExhausted::Compensate,
        )
        .unwrap()
    }

    fn in_order(n: usize) -> Saga {
        let names = ["a", "b", "c", "d", "e"];
        let steps: Vec<(&str, Vec<&str>)> = names[..n].iter().map(|n| (*n, vec![])).collect();
        Saga::new("s", &steps, 3, OnExhausted::Compensate).unwrap()
    }

    /// Sends whatever `next` says and answers every action with `answer(step)`.
    fn drive(saga: &mut Saga, answer: impl Fn(StepId) -> ActionResult) -> Vec<Work> {
        let mut sent = Vec::new();
        for _ in 0..100 {
            let work = saga.next();
            if work.is_empty() {
                break;
            }
            for w in work {
                let _ = saga.sent(w);
                sent.push(w);
                match w {
                    Work::Action(i) => {
                        let _ = saga.action_result(i, answer(i));
                    }
                    Work::Compensation(i) => {
                        let _ = saga.compensation_result(i, Ok(()));
                    }
                }
            }
        }
        sent
    }

    #[test]
    fn steps_without_dependencies_run_in_order_and_complete() {
        let mut saga = in_order(3);
        assert_eq!(saga.next(), vec![Work::Action(0)], "one at a time");
        let sent = drive(&mut saga, |i| ActionResult::Succeeded(vec![i as u8]));
        assert_eq!(sent, [Work::Action(0), Work::Action(1), Work::Action(2)]);
        assert_eq!(saga.state, SagaState::Completed);
        assert_eq!(saga.inputs(2), vec![("b", &[1u8][..])]);
    }

    #[test]
    fn a_failing_step_compensates_exactly_the_steps_that_ran_in_reverse() {
        let mut saga = in_order(4);
        let sent = drive(&mut saga, |i| match i {
            2 => ActionResult::Failed("card declined".into()),
            _ => ActionResult::Succeeded(vec![]),
        });
        assert_eq!(
            sent,
            [
                Work::Action(0),
                Work::Action(1),
                Work::Action(2),
                // The failed step's compensation is null at the barrier; it goes first.
                Work::Compensation(2),
                Work::Compensation(1),
                Work::Compensation(0),
            ]
        );
        assert_eq!(
            saga.steps[3].state,
            StepState::Pending,
            "never sent, never compensated"
        );
        assert_eq!(saga.state, SagaState::Compensated);
        assert!(saga.reason.contains("card declined"), "{}", saga.reason);
    }

    #[test]
    fn a_failure_is_flushed_before_any_compensation_and_a_success_is_a_hint() {
        let mut saga = in_order(2);
        assert!(
            saga.submitted().flush,
            "the plan is durable before the first step"
        );
        let _ = saga.sent(Work::Action(0));
        assert!(!saga.action_result(0, ActionResult::Succeeded(vec![])).flush);
        let _ = saga.sent(Work::Action(1));
        assert!(
            saga.action_result(1, ActionResult::Failed("no".into()))
                .flush
        );
    }

    #[test]
    fn a_dag_runs_independent_steps_at_once_and_joins() {
        let steps = [
            ("user", vec![]),
            ("inventory", vec!["user"]),
            ("order", vec!["user"]),
            ("payment", vec!["inventory", "order"]),
        ];
        let mut saga = Saga::new("s", &steps, 3, OnExhausted::Compensate).unwrap();
        let _ = saga.sent(Work::Action(0));
        let _ = saga.action_result(0, ActionResult::Succeeded(vec![]));
        assert_eq!(
            saga.next(),
            vec![Work::Action(1), Work::Action(2)],
            "both at once"
        );
        let _ = saga.sent(Work::Action(1));
        let _ = saga.sent(Work::Action(2));
        let _ = saga.action_result(1, ActionResult::Succeeded(vec![]));
        assert!(saga.next().is_empty(), "payment waits for order");
        let _ = saga.action_result(2, ActionResult::Succeeded(b"o-1".to_vec()));
        assert_eq!(saga.next(), vec![Work::Action(3)]);
        assert_eq!(saga.inputs(3).len(), 2);
    }

    #[test]
    fn a_compensation_waits_for_an_action_in_flight_that_depends_on_it() {
        let steps = [("a", vec![]), ("b", vec!["a"]), ("c", vec!["a"])];
        let mut saga = Saga::new("s", &steps, 3, OnExhausted::Compensate).unwrap();
        let _ = saga.sent(Work::Action(0));
        let _ = saga.action_result(0, ActionResult::Succeeded(vec![]));
        let _ = saga.sent(Work::Action(1));
        let _ = saga.sent(Work::Action(2));
        let _ = saga.action_result(1, ActionResult::Failed("no".into()));
        // c is in flight: its answer decides what of it to undo, and a is undone after it.
        assert_eq!(saga.next(), vec![Work::Compensation(1)]);
        let _ = saga.sent(Work::Compensation(1));
        let _ = saga.compensation_result(1, Ok(()));
        assert!(saga.next().is_empty());
        let _ = saga.action_result(2, ActionResult::Succeeded(vec![]));
        assert_eq!(saga.next(), vec![Work::Compensation(2)]);
        let _ = saga.sent(Work::Compensation(2));
        let _ = saga.compensation_result(2, Ok(()));
        assert_eq!(saga.next(), vec![Work::Compensation(0)]);
    }

    #[test]
    fn no_action_starts_once_the_saga_compensates() {
        let steps = [("a", vec![]), ("b", vec![]), ("c", vec!["a"])];
        let mut saga = Saga::new("s", &steps, 3, OnExhausted::Compensate).unwrap();
        let _ = saga.sent(Work::Action(0));
        let _ = saga.sent(Work::Action(1));
        let _ = saga.action_result(1, ActionResult::Failed("no".into()));
        let _ = saga.action_result(0, ActionResult::Succeeded(vec![]));
        assert!(
            !saga.next().contains(&Work::Action(2)),
            "c's dependency succeeded, but the saga compensates"
        );
    }

    #[test]
    fn retries_run_out_into_compensation_or_a_stop() {
        for (policy, end) in [
            (OnExhausted::Compensate, SagaState::Compensated),
            (OnExhausted::Stop, SagaState::Stuck),
        ] {
            let mut saga = Saga::new("s", &[("a", vec![]), ("b", vec![])], 2, policy).unwrap();
            drive(&mut saga, |i| match i {
                1 => ActionResult::RetryLater("unreachable".into()),
                _ => ActionResult::Succeeded(vec![]),
            });
            assert_eq!(saga.state, end, "{policy:?}");
            assert_eq!(saga.steps[1].attempts, 2, "{policy:?}");
        }
    }

    #[test]
    fn after_a_restart_a_lost_answer_is_asked_again() {
        let mut saga = in_order(2);
        let _ = saga.sent(Work::Action(0));
        // The coordinator dies before the answer arrives; its record said Running.
        saga.recovered();
        assert_eq!(saga.steps[0].state, StepState::Unknown);
        assert_eq!(
            saga.next(),
            vec![Work::Action(0)],
            "sent again: the barrier answers"
        );
    }

    #[test]
    fn after_a_restart_mid_compensation_the_compensation_is_sent_again() {
        let mut saga = in_order(2);
        let _ = saga.sent(Work::Action(0));
        let _ = saga.action_result(0, ActionResult::Succeeded(vec![]));
        let _ = saga.sent(Work::Action(1));
        let _ = saga.action_result(1, ActionResult::Failed("no".into()));
        let _ = saga.sent(Work::Compensation(1));
        saga.recovered();
        assert_eq!(saga.next(), vec![Work::Compensation(1)]);
    }

    #[test]
    fn a_compensation_that_keeps_failing_leaves_the_saga_stuck_and_still_retried() {
        let mut saga = Saga::new("s", &[("a", vec![])], 2, OnExhausted::Compensate).unwrap();
        let _ = saga.sent(Work::Action(0));
        let _ = saga.action_result(0, ActionResult::Failed("no".into()));
        for _ in 0..2 {
            let _ = saga.sent(Work::Compensation(0));
            let _ = saga.compensation_result(0, Err("db down".into()));
        }
        assert_eq!(saga.state, SagaState::Stuck);
        assert_eq!(saga.next(), vec![Work::Compensation(0)], "never given up");
        let _ = saga.sent(Work::Compensation(0));
        let _ = saga.compensation_result(0, Ok(()));
        assert_eq!(saga.state, SagaState::Compensated);
    }

    #[test]
    fn a_late_answer_to_a_settled_step_changes_nothing() {
        let mut saga = in_order(1);
        let _ = saga.sent(Work::Action(0));
        let _ = saga.action_result(0, ActionResult::Failed("no".into()));
        let _ = saga.sent(Work::Compensation(0));
        let _ = saga.compensation_result(0, Ok(()));
        let before = saga.clone();
        let _ = saga.action_result(0, ActionResult::Succeeded(vec![]));
        assert_eq!(saga, before);
    }

    /// A saga stopped at step b (out of attempts under STOP), a already applied.
    fn stopped() -> Saga {
        let mut saga =
            Saga::new("s", &[("a", vec![]), ("b", vec![])], 1, OnExhausted::Stop).unwrap();
        drive(&mut saga, |i| match i {
            0 => ActionResult::Succeeded(vec![]),
            _ => ActionResult::RetryLater("unreachable".into()),
        });
        assert_eq!(saga.state, SagaState::Stuck);
        saga
    }

    #[test]
    fn an_operator_retries_a_stopped_step_afresh() {
        let mut saga = stopped();
        assert!(saga.intervene(Intervention::Retry).unwrap().flush);
        assert_eq!(saga.next(), vec![Work::Action(1)]);
        assert_eq!(saga.steps[1].attempts, 0, "attempts counted afresh");
        drive(&mut saga, |_| ActionResult::Succeeded(vec![]));
        assert_eq!(saga.state, SagaState::Completed);
    }

    #[test]
    fn an_operator_skips_a_stopped_step_or_has_the_saga_compensated() {
        let mut skipped = stopped();
        let _ = skipped.intervene(Intervention::Skip).unwrap();
        assert_eq!(skipped.state, SagaState::Completed);
        let mut undone = stopped();
        let _ = undone.intervene(Intervention::Compensate).unwrap();
        let sent = drive(&mut undone, |_| ActionResult::Succeeded(vec![]));
        assert_eq!(sent, [Work::Compensation(1), Work::Compensation(0)]);
        assert_eq!(undone.state, SagaState::Compensated);
    }

    #[test]
    fn an_operator_retries_or_skips_a_compensation_that_keeps_failing() {
        let stuck = || {
            let mut saga = Saga::new("s", &[("a", vec![])], 1, OnExhausted::Compensate).unwrap();
            let _ = saga.sent(Work::Action(0));
            let _ = saga.action_result(0, ActionResult::Failed("no".into()));
            let _ = saga.sent(Work::Compensation(0));
            let _ = saga.compensation_result(0, Err("db down".into()));
            assert_eq!(saga.state, SagaState::Stuck);
            saga
        };
        let mut retried = stuck();
        let _ = retried.intervene(Intervention::Retry).unwrap();
        assert_eq!(retried.state, SagaState::Compensating);
        assert_eq!(retried.steps[0].compensations, 0);
        let mut skipped = stuck();
        let _ = skipped.intervene(Intervention::Skip).unwrap();
        assert_eq!(skipped.state, SagaState::Compensated);
        assert_eq!(
            stuck().intervene(Intervention::Compensate),
            Err(InterventionError::AlreadyCompensating("s".into()))
        );
        let mut done = in_order(1);
        drive(&mut done, |_| ActionResult::Succeeded(vec![]));
        assert!(matches!(
            done.intervene(Intervention::Retry),
            Err(InterventionError::NotStuck { .. })
        ));
    }

    #[test]
    fn bad_plans_are_refused_with_what_is_wrong() {
        let bad = |steps: &[(&str, Vec<&str>)]| {
            Saga::new("s", steps, 3, OnExhausted::Compensate).unwrap_err()
        };
        assert_eq!(bad(&[]), PlanError::NoSteps);
        assert_eq!(
            bad(&[("a", vec![]), ("a", vec![])]),
            PlanError::DuplicateName("a".into())
        );
        assert!(matches!(
            bad(&[("a", vec!["x"])]),
            PlanError::UnknownDependency { .. }
        ));
        assert!(matches!(
            bad(&[("a", vec!["b"]), ("b", vec!["a"])]),
            PlanError::Cycle(_)
        ));
        assert!(matches!(
            Saga::new("s", &[("a", vec![])], MAX_ATTEMPTS + 1, OnExhausted::Stop),
            Err(PlanError::Attempts { .. })
        ));
    }
}
