//! The coordinator's sagas (docs/SAGAS.md): SubmitSaga, GetSaga and ListSagas, the driver that
//! runs each saga's machine (`saga.rs`) against the participants, and the resumption of every
//! unfinished saga after a restart or a failover.
//!
//! The driver is the only code that touches a saga's machine after submission, and it does
//! what the machine says: it sends what [`Saga::next`] names, writes the record after every
//! transition, and flushes it before going on when the transition says so ([`Recorded::flush`]:
//! the plan before its first step, a failure before the first compensation). A saga lives in
//! memory from submission until it is final; then its record in the log is all there is.

use super::error::Error;
use super::log::Log;
use super::participants::{Participants, PeerError, ServiceCall};
use super::saga::{ActionResult, Intervention, Recorded, Saga, SagaState, StepState, Work};
use super::saga_plan::{Call, Plan};
use super::transactions::{Coordinator, now_ms};
use crate::proto::{self, SagaOp, SagaStepOutcome};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

/// How long retention waits for a participant to forget a step's barrier rows.
const FORGET_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest GetSaga waits for a saga to end.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// A saga from submission until it is final.
pub(super) struct LiveSaga {
    pub saga: Mutex<Saga>,
    pub plan: Plan,
    /// Bumped at every transition, for GetSaga's wait.
    changed: watch::Sender<u64>,
    /// A driver runs it. Read and written with `saga` locked, so that an operator's decision
    /// and a driver's exit cannot pass each other: one of them starts the next driver.
    driving: AtomicBool,
}

impl LiveSaga {
    fn new(saga: Saga, plan: Plan) -> Arc<LiveSaga> {
        Arc::new(LiveSaga {
            saga: Mutex::new(saga),
            plan,
            changed: watch::Sender::new(0),
            driving: AtomicBool::new(true),
        })
    }

    pub(super) fn snapshot(&self) -> Saga {
        self.saga.lock().unwrap().clone()
    }
}

/// Whether a saga has got as far as it will without an operator.
fn ended(saga: &Saga) -> bool {
    saga.state.is_final() || (saga.state == SagaState::Stuck && saga.next().is_empty())
}

impl<L: Log, P: Participants> Coordinator<L, P> {
    /// SubmitSaga: checks the plan, makes it durable, starts the saga, and answers it as it is
    /// then. The same id with the same plan again answers that saga; with another, a conflict.
    pub async fn submit_saga(
        self: &Arc<Self>,
        req: &proto::SubmitSagaRequest,
    ) -> Result<Saga, Error> {
        let (mut saga, plan) = Plan::of(req, |e| self.participants.check_endpoint(e))?;
        saga.created_ms = now_ms();
        let live = {
            let mut sagas = self.sagas.lock().unwrap();
            let existing = match sagas.get(&saga.id) {
                Some(live) => Some(live.snapshot()),
                None => self.log.get_saga(&saga.id)?,
            };
            match existing {
                Some(existing) => Err(existing),
                None if self.is_draining() => return Err(Error::ShuttingDown),
                None => {
                    let Recorded { flush } = saga.submitted();
                    debug_assert!(flush, "the plan is durable before any step");
                    self.put_saga(&saga);
                    let live = LiveSaga::new(saga.clone(), plan);
                    sagas.insert(saga.id.clone(), Arc::clone(&live));
                    Ok(live)
                }
            }
        };
        let live = match live {
            Ok(live) => live,
            Err(existing) if existing.plan != saga.plan => {
                return Err(Error::SagaConflict(format!(
                    "saga {:?} was submitted earlier with another plan; a saga id names one plan (choose a new id for a new saga)",
                    saga.id
                )));
            }
            Err(existing) => {
                // Its plan may not be durable yet, if the first submit is still flushing it.
                self.sync().await;
                return Ok(self.find_saga(&existing.id)?.unwrap_or(existing));
            }
        };
        crate::failpoint!("coordinator::saga_submitted");
        self.sync().await;
        crate::failpoint!("coordinator::saga_written");
        metrics::counter!("twopc_sagas_submitted_total").increment(1);
        let shown = live.snapshot();
        tracing::info!(saga_id = %shown.id, steps = shown.steps.len(), "saga submitted");
        self.spawn_saga(live);
        Ok(shown)
    }

    /// GetSaga: the saga as it is, after waiting up to `wait` for it to end.
    pub async fn get_saga(&self, id: &str, wait: Duration) -> Result<Saga, Error> {
        let live = self.sagas.lock().unwrap().get(id).cloned();
        let Some(live) = live else {
            return self
                .log
                .get_saga(id)?
                .ok_or_else(|| Error::SagaNotFound(id.to_string()));
        };
        let mut changed = live.changed.subscribe();
        let until = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        loop {
            let saga = live.snapshot();
            if ended(&saga) {
                return Ok(saga);
            }
            match tokio::time::timeout_at(until, changed.changed()).await {
                Ok(Ok(())) => continue,
                // Out of time, or the driver is gone (it finished: the log has the end).
                Ok(Err(_)) => return Ok(self.log.get_saga(id)?.unwrap_or(saga)),
                Err(_) => return Ok(saga),
            }
        }
    }

    /// ListSagas: live ones and the log's, newest first.
    pub fn list_sagas(&self, states: &[SagaState], limit: usize) -> Result<Vec<Saga>, Error> {
        let mut all: std::collections::HashMap<String, Saga> = self
            .log
            .sagas()?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        for live in self.sagas.lock().unwrap().values() {
            let s = live.snapshot();
            all.insert(s.id.clone(), s);
        }
        let mut sagas: Vec<Saga> = all
            .into_values()
            .filter(|s| states.is_empty() || states.contains(&s.state))
            .collect();
        sagas.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
        sagas.truncate(limit);
        Ok(sagas)
    }

    /// ResolveSaga: an operator's decision on a stuck saga, durable before the answer, and a
    /// driver to act on it if none runs.
    pub async fn resolve_saga(
        self: &Arc<Self>,
        id: &str,
        what: Intervention,
        operator: &str,
        reason: &str,
    ) -> Result<Saga, Error> {
        let live = self.sagas.lock().unwrap().get(id).cloned();
        let Some(live) = live else {
            return Err(match self.log.get_saga(id)? {
                Some(saga) => Error::SagaConflict(format!(
                    "saga {id:?} is {:?}: it is final, nothing is left to decide",
                    saga.state
                )),
                None => Error::SagaNotFound(id.to_string()),
            });
        };
        let (shown, start) = {
            let mut saga = live.saga.lock().unwrap();
            let Recorded { flush } = saga
                .intervene(what)
                .map_err(|e| Error::SagaConflict(e.to_string()))?;
            debug_assert!(
                flush,
                "an operator's decision is durable before it is acted on"
            );
            if saga.state.is_final() {
                saga.finished_ms = now_ms();
            }
            self.put_saga(&saga);
            (saga.clone(), !live.driving.swap(true, Ordering::SeqCst))
        };
        self.sync().await;
        tracing::warn!(audit = true, operator, reason, saga_id = id, action = ?what, state = ?shown.state,
            "operator decided a stuck saga");
        live.changed.send_modify(|v| *v += 1);
        if shown.state.is_final() && !start {
            // The driver still running finds it final and retires it.
        } else if shown.state.is_final() {
            self.sagas.lock().unwrap().remove(id);
            live.driving.store(false, Ordering::SeqCst);
        } else if start {
            self.spawn_saga(live);
        }
        Ok(shown)
    }

    /// Resumes every saga the log has unfinished: the answers to steps that were in flight
    /// are lost, so those steps are sent again (the barrier answers a repeat).
    pub(super) fn recover_sagas(self: &Arc<Self>) -> Result<usize, Error> {
        let unfinished = self.log.unfinished_sagas()?;
        let n = unfinished.len();
        for mut saga in unfinished {
            let plan = Plan::of_logged(&saga)?;
            saga.recovered();
            tracing::info!(saga_id = %saga.id, state = ?saga.state, "resuming saga");
            let live = LiveSaga::new(saga, plan);
            self.sagas
                .lock()
                .unwrap()
                .insert(live.snapshot().id, Arc::clone(&live));
            self.spawn_saga(live);
        }
        if n > 0 {
            metrics::counter!("twopc_sagas_recovered_total").increment(n as u64);
        }
        Ok(n)
    }

    /// Retention: every final saga that finished before `before_ms` has its barrier rows
    /// forgotten at each participant of its SQL steps, then its record removed. A saga whose
    /// participant cannot be reached is kept for the next pass: its rows must go first, or
    /// they would stay for ever. Returns how many sagas were pruned.
    pub(super) async fn prune_sagas(&self, before_ms: i64) -> Result<usize, Error> {
        let mut pruned = 0;
        for saga in self.log.sagas()? {
            let due = saga.state.is_final() && saga.finished_ms > 0 && saga.finished_ms < before_ms;
            if !due || self.sagas.lock().unwrap().contains_key(&saga.id) {
                continue;
            }
            let plan = match Plan::of_logged(&saga) {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::warn!(saga_id = %saga.id, error = %e, "cannot read a finished saga's plan; keeping it");
                    continue;
                }
            };
            let key = self.log.marker_key();
            let mut forgotten = true;
            for (step, sent) in saga.steps.iter().zip(&plan.steps) {
                if step.state == StepState::Pending {
                    // Never sent: no row anywhere.
                    continue;
                }
                let mut endpoints: Vec<&str> = [&sent.action, &sent.compensation]
                    .into_iter()
                    .filter_map(|c| match c {
                        Call::Sql(sql) => Some(sql.participant.as_str()),
                        // A service's own barrier rows are the service's to prune.
                        Call::Grpc(_) => None,
                    })
                    .collect();
                endpoints.dedup();
                for endpoint in endpoints {
                    let forget = proto::SagaStepRequest {
                        saga_id: saga.id.clone(),
                        step: step.name.clone(),
                        op: SagaOp::Forget as i32,
                        action_secret: key
                            .barrier_secret(&saga.id, &step.name, "action")
                            .into_bytes(),
                        compensation_secret: key
                            .barrier_secret(&saga.id, &step.name, "compensate")
                            .into_bytes(),
                        ..Default::default()
                    };
                    if let Err(e) = self
                        .participants
                        .saga_step(endpoint, forget, FORGET_TIMEOUT)
                        .await
                    {
                        tracing::warn!(saga_id = %saga.id, endpoint, error = %e, "cannot forget a finished saga's barrier rows yet; keeping it");
                        forgotten = false;
                    }
                }
            }
            if forgotten {
                self.log.delete_saga(&saga.id)?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// A live saga, or a logged one.
    fn find_saga(&self, id: &str) -> Result<Option<Saga>, Error> {
        if let Some(live) = self.sagas.lock().unwrap().get(id) {
            return Ok(Some(live.snapshot()));
        }
        Ok(self.log.get_saga(id)?)
    }

    /// Writes a saga's record; a log that cannot be written is fatal, as for transactions.
    fn put_saga(&self, saga: &Saga) {
        if let Err(e) = self.log.put_saga(saga) {
            tracing::error!(saga_id = %saga.id, error = %e, "decision log write failed; stopping the coordinator");
            std::process::abort();
        }
    }

    fn spawn_saga(self: &Arc<Self>, live: Arc<LiveSaga>) {
        let span = tracing::info_span!("saga", saga_id = %live.snapshot().id);
        tokio::spawn(Arc::clone(self).drive(live).instrument(span));
    }

    /// Runs a saga until it is final, or stuck with nothing to send.
    async fn drive(self: Arc<Self>, live: Arc<LiveSaga>) {
        let mut calls = JoinSet::new();
        loop {
            let sends = {
                let mut saga = live.saga.lock().unwrap();
                let work = saga.next();
                let sends: Vec<_> = work
                    .into_iter()
                    .map(|w| {
                        let _ = saga.sent(w);
                        (
                            w,
                            self.step_request(&saga, &live.plan, w),
                            attempt(&saga, w),
                        )
                    })
                    .collect();
                if !sends.is_empty() {
                    self.put_saga(&saga);
                }
                sends
            };
            live.changed.send_modify(|v| *v += 1);
            for (work, send, attempt) in sends {
                let core = Arc::clone(&self);
                let options = live.plan.options;
                calls.spawn(async move {
                    let backoff = options.backoff(attempt);
                    if !backoff.is_zero() {
                        tokio::time::sleep(backoff).await;
                    }
                    let peers = &core.participants;
                    let answer = match send {
                        Send::Participant(endpoint, request) => Answer::Participant(
                            peers
                                .saga_step(&endpoint, request, options.step_timeout)
                                .await,
                        ),
                        Send::Service(call) => {
                            Answer::Service(peers.call_service(call, options.step_timeout).await)
                        }
                    };
                    (work, answer)
                });
            }
            let Some(done) = calls.join_next().await else {
                let saga = live.saga.lock().unwrap();
                if !saga.next().is_empty() {
                    // An operator moved it on meanwhile.
                    continue;
                }
                live.driving.store(false, Ordering::SeqCst);
                break;
            };
            let (work, answer) = match done {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!(error = %e, "a saga step's call failed unexpectedly");
                    continue;
                }
            };
            match work {
                Work::Action(_) => {
                    crate::failpoint!("coordinator::saga_step_sent");
                }
                Work::Compensation(_) => {
                    crate::failpoint!("coordinator::saga_compensation_sent");
                }
            }
            let flush = {
                let mut saga = live.saga.lock().unwrap();
                let recorded = match work {
                    Work::Action(i) => {
                        let result = action_result(answer);
                        tracing::debug!(step = %saga.steps[i].name, ?result, "action answered");
                        saga.action_result(i, result)
                    }
                    Work::Compensation(i) => {
                        let result = compensation_result(answer);
                        tracing::debug!(step = %saga.steps[i].name, ?result, "compensation answered");
                        saga.compensation_result(i, result)
                    }
                };
                if saga.state.is_final() && saga.finished_ms == 0 {
                    saga.finished_ms = now_ms();
                }
                self.put_saga(&saga);
                recorded.flush
            };
            if flush {
                self.sync().await;
                crate::failpoint!("coordinator::saga_failed_written");
            }
        }
        let saga = live.snapshot();
        match saga.state {
            state if state.is_final() => {
                tracing::info!(saga_id = %saga.id, ?state, reason = %saga.reason, "saga finished");
                let outcome = if state == SagaState::Completed {
                    "completed"
                } else {
                    "compensated"
                };
                metrics::counter!("twopc_sagas_total", "outcome" => outcome).increment(1);
                self.sagas.lock().unwrap().remove(&saga.id);
            }
            _ => {
                tracing::warn!(saga_id = %saga.id, reason = %saga.reason, "saga stuck: waiting for an operator");
                metrics::counter!("twopc_sagas_total", "outcome" => "stuck").increment(1);
            }
        }
        live.changed.send_modify(|v| *v += 1);
    }

    /// What sends `work`, and where.
    fn step_request(&self, saga: &Saga, plan: &Plan, work: Work) -> Send {
        let (i, op, call) = match work {
            Work::Action(i) => (i, SagaOp::Action, &plan.steps[i].action),
            Work::Compensation(i) => (i, SagaOp::Compensate, &plan.steps[i].compensation),
        };
        let step = &saga.steps[i].name;
        let key = self.log.marker_key();
        let secret = |half| key.barrier_secret(&saga.id, step, half).into_bytes();
        let call = match call {
            Call::Sql(sql) => sql,
            Call::Grpc(grpc) => {
                return Send::Service(ServiceCall {
                    endpoint: grpc.endpoint.clone(),
                    method: grpc.method.clone(),
                    request: grpc.request.clone(),
                    saga_id: saga.id.clone(),
                    step: step.clone(),
                    compensate: op == SagaOp::Compensate,
                    action_secret: secret("action"),
                    compensation_secret: (op == SagaOp::Compensate).then(|| secret("compensate")),
                });
            }
        };
        let inputs = match (op, call.bind_outputs) {
            (SagaOp::Action, true) => saga
                .inputs(i)
                .into_iter()
                .map(|(_, output)| first_row(output))
                .collect(),
            _ => Vec::new(),
        };
        let request = proto::SagaStepRequest {
            saga_id: saga.id.clone(),
            step: step.clone(),
            op: op as i32,
            action_secret: secret("action"),
            compensation_secret: match op {
                SagaOp::Compensate => secret("compensate"),
                _ => Vec::new(),
            },
            statements: call.statements.clone(),
            bind_outputs: call.bind_outputs,
            inputs,
        };
        Send::Participant(call.participant.clone(), request)
    }
}

/// One half of a step on its way.
enum Send {
    /// SQL, to a participant (`Participant.RunSagaStep`).
    Participant(String, proto::SagaStepRequest),
    /// A method of the user's service.
    Service(ServiceCall),
}

/// How it was answered.
enum Answer {
    Participant(Result<proto::SagaStepResponse, PeerError>),
    Service(Result<Vec<u8>, tonic::Status>),
}

/// A service's status that says the step failed for good (compensate), rather than that it
/// could not be done now (retry): docs/SAGAS.md §2 and `GrpcCall` in the proto.
fn fails_for_good(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        FailedPrecondition | InvalidArgument | OutOfRange | NotFound | AlreadyExists
    )
}

fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The how-manieth send of `work` this is.
fn attempt(saga: &Saga, work: Work) -> u32 {
    match work {
        Work::Action(i) => saga.steps[i].attempts,
        Work::Compensation(i) => saga.steps[i].compensations,
    }
}

/// The first row of a step's output (an encoded `StatementResult`), as the next step binds it.
fn first_row(output: &[u8]) -> proto::Row {
    <proto::StatementResult as prost::Message>::decode(output)
        .ok()
        .and_then(|r| r.rows.into_iter().next())
        .unwrap_or_default()
}

/// What an action's answer means to the machine.
fn action_result(answer: Answer) -> ActionResult {
    let resp = match answer {
        Answer::Participant(Ok(resp)) => resp,
        Answer::Participant(Err(e)) => return ActionResult::RetryLater(e.to_string()),
        Answer::Service(Ok(response)) => return ActionResult::Succeeded(response),
        Answer::Service(Err(status)) if fails_for_good(status.code()) => {
            return ActionResult::Failed(status_text(&status));
        }
        Answer::Service(Err(status)) => return ActionResult::RetryLater(status_text(&status)),
    };
    let output = || prost::Message::encode_to_vec(&resp.output.clone().unwrap_or_default());
    match resp.outcome() {
        SagaStepOutcome::Applied | SagaStepOutcome::Repeated => ActionResult::Succeeded(output()),
        SagaStepOutcome::Failed => ActionResult::Failed(with_sqlstate(&resp)),
        SagaStepOutcome::Fenced => {
            ActionResult::Failed("its compensation came first: it never ran".into())
        }
        other => ActionResult::RetryLater(format!(
            "the participant answered an action with {}",
            other.as_str_name()
        )),
    }
}

/// What a compensation's answer means: applied (or null, or a repeat), or to be sent again.
fn compensation_result(answer: Answer) -> Result<(), String> {
    let resp = match answer {
        Answer::Participant(answer) => answer.map_err(|e| e.to_string())?,
        // Whatever a service answers but OK, its compensation is sent again.
        Answer::Service(answer) => return answer.map(drop).map_err(|s| status_text(&s)),
    };
    match resp.outcome() {
        SagaStepOutcome::Applied | SagaStepOutcome::Repeated | SagaStepOutcome::Null => Ok(()),
        SagaStepOutcome::Failed => Err(with_sqlstate(&resp)),
        other => Err(format!(
            "the participant answered a compensation with {}",
            other.as_str_name()
        )),
    }
}

fn with_sqlstate(resp: &proto::SagaStepResponse) -> String {
    match resp.sqlstate.as_str() {
        "" => resp.error.clone(),
        // PostgreSQL's message, as the participant describes it, may name it already.
        code if resp.error.contains(code) => resp.error.clone(),
        code => format!("{} (SQLSTATE {code})", resp.error),
    }
}
