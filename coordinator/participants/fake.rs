//! Participants in memory, for the drivers' tests: each endpoint keeps its prepared branches the
//! way its PostgreSQL would (they survive anything the coordinator does), answers phase 2
//! idempotently, and can be told to misbehave: vote no, lose a reply after acting, hang, or be
//! down. Whatever it is told, it never lets a branch end against the decision silently: a
//! COMMIT for a rolled-back branch or a rollback of a committed one is counted as an alarm,
//! which every scenario checks is zero.
//!
//! The state sits behind a std mutex, outside any runtime, because a test "crashes" a
//! coordinator by dropping its whole runtime while calls into this are in flight, and the
//! participants must outlive it, as real ones outlive a coordinator process.

use super::{Ending, Participants, PeerError, ServiceCall};
use crate::coordinator::registry::Health;
use crate::proto::vote::OnePhaseOutcome;
use crate::proto::vote::Vote;
use crate::proto::{LockWait, SagaStepRequest, SagaStepResponse, TxnId};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a fake participant answers Prepare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnPrepare {
    /// Prepares the branch and votes yes.
    #[default]
    Yes,
    /// Wrote nothing: votes read-only, nothing stays prepared.
    ReadOnly,
    /// Refuses (a failed statement, a deferred constraint): votes no, nothing prepared.
    No,
    /// Prepares the branch, then the reply is lost: the coordinator hears nothing.
    LoseReply,
    /// Never gets to it: nothing prepared, no answer.
    Hang,
}

/// How a fake participant answers Commit and Rollback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnFinish {
    /// Does it and acknowledges.
    #[default]
    Ack,
    /// Does it, then the reply is lost.
    LoseReply,
    /// Never gets to it.
    Hang,
    /// Fails at once without doing it, as a participant whose PostgreSQL is down does.
    Unreachable,
}

/// How a fake participant answers CommitOnePhase for a branch it has not finished yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnOnePhase {
    /// Commits it (with its marker) and answers.
    #[default]
    Commit,
    /// Its COMMIT fails (a deferred constraint): rolled back, ABORTED.
    Refuse,
    /// Commits it, then the reply is lost.
    LoseReply,
    /// Never gets to it: nothing committed, no answer.
    Hang,
    /// Fails at once without doing it, as a participant whose PostgreSQL is down does.
    Unreachable,
}

/// How one fake participant behaves from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Behaviour {
    pub prepare: OnPrepare,
    pub finish: OnFinish,
    pub one_phase: OnOnePhase,
    /// Unreachable: every call fails at once, as with a refused connection.
    pub down: bool,
}

/// What one fake participant's PostgreSQL holds.
#[derive(Debug, Default)]
struct Node {
    behaviour: Behaviour,
    /// Prepared branches and their xids: what `pg_prepared_xacts` would list.
    prepared: BTreeMap<TxnId, u64>,
    committed: BTreeSet<TxnId>,
    rolled_back: BTreeSet<TxnId>,
    /// One-phase commits' markers (`twopc.one_phase_markers`), not yet forgotten.
    markers: BTreeSet<TxnId>,
    /// Open branches this participant lost (it restarted): never committed, fenced if asked.
    lost: BTreeSet<TxnId>,
    next_xid: u64,
    /// Requests received, in order, for assertions on what the coordinator sent.
    calls: Vec<Call>,
    /// Branches that ended against what was asked. Must stay 0.
    alarms: usize,
    /// What `Waits` answers (a test sets it: the fake has no locks of its own).
    waits: Vec<LockWait>,
    /// The cause each rollback carried, by txn.
    causes: HashMap<TxnId, (String, String)>,
    /// Saga steps' barrier rows, by secret (`twopc.saga_barrier`).
    barrier: HashMap<Vec<u8>, BarrierRow>,
    /// Saga steps whose action fails here (a constraint), by step name.
    failing_steps: BTreeSet<String>,
    /// Every saga action and compensation that applied here, in order.
    applied: Vec<Applied>,
    /// Compensations cannot reach the database (actions can).
    compensations_down: bool,
}

/// A saga step's barrier row, as the participant's database keeps it.
#[derive(Clone, Debug)]
enum BarrierRow {
    Action(Option<crate::proto::StatementResult>),
    Fence,
    Compensate,
}

/// A saga action or compensation that applied at a fake participant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub saga_id: String,
    pub step: String,
    pub compensation: bool,
}

/// A request a fake participant received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Prepare(TxnId),
    Commit(TxnId),
    Rollback(TxnId),
    /// CommitOnePhase, with the markers it said to forget.
    CommitOnePhase(TxnId, Vec<TxnId>),
    Recover,
}

/// Every fake participant, by endpoint. Cloning shares them.
#[derive(Clone, Default)]
pub struct FakeParticipants {
    nodes: Arc<Mutex<HashMap<String, Node>>>,
}

impl FakeParticipants {
    /// Sets how the participant at `endpoint` behaves from now on.
    pub fn set(&self, endpoint: &str, behaviour: Behaviour) {
        self.with(endpoint, |n| n.behaviour = behaviour);
    }

    /// The txns prepared at `endpoint`, as its `pg_prepared_xacts` would list them.
    pub fn prepared(&self, endpoint: &str) -> Vec<TxnId> {
        self.with(endpoint, |n| n.prepared.keys().copied().collect())
    }

    pub fn committed(&self, endpoint: &str, txn: TxnId) -> bool {
        self.with(endpoint, |n| n.committed.contains(&txn))
    }

    pub fn rolled_back(&self, endpoint: &str, txn: TxnId) -> bool {
        self.with(endpoint, |n| n.rolled_back.contains(&txn))
    }

    /// The one-phase commit markers `endpoint` still keeps.
    pub fn markers(&self, endpoint: &str) -> Vec<TxnId> {
        self.with(endpoint, |n| n.markers.iter().copied().collect())
    }

    /// The participant restarted while `txn`'s branch was open: its statements are gone.
    pub fn lose_branch(&self, endpoint: &str, txn: TxnId) {
        self.with(endpoint, |n| {
            n.lost.insert(txn);
        });
    }

    /// The requests `endpoint` received, in order.
    pub fn calls(&self, endpoint: &str) -> Vec<Call> {
        self.with(endpoint, |n| n.calls.clone())
    }

    /// Branches, at any participant, that ended against what the coordinator asked.
    pub fn alarms(&self) -> usize {
        self.nodes.lock().unwrap().values().map(|n| n.alarms).sum()
    }

    /// Prepares a branch behind the coordinator's back, as one whose coordinator died before
    /// logging anything would be: an orphan.
    pub fn prepare_orphan(&self, endpoint: &str, txn: TxnId) {
        self.with(endpoint, |n| {
            n.next_xid += 1;
            n.prepared.insert(txn, n.next_xid);
        });
    }

    /// The action of every saga step named `step` fails at `endpoint` from now on, as a
    /// constraint would fail it.
    pub fn fail_step(&self, endpoint: &str, step: &str) {
        self.with(endpoint, |n| {
            n.failing_steps.insert(step.to_string());
        });
    }

    /// Saga compensations sent to `endpoint` fail unapplied (`down`) or go through.
    pub fn set_compensations_down(&self, endpoint: &str, down: bool) {
        self.with(endpoint, |n| n.compensations_down = down);
    }

    /// How many barrier rows `endpoint` keeps.
    pub fn barrier_rows(&self, endpoint: &str) -> usize {
        self.with(endpoint, |n| n.barrier.len())
    }

    /// Every saga action and compensation that applied at `endpoint`, in order.
    pub fn applied(&self, endpoint: &str) -> Vec<Applied> {
        self.with(endpoint, |n| n.applied.clone())
    }

    /// What `Waits` at `endpoint` answers from now on.
    pub fn set_waits(&self, endpoint: &str, waits: Vec<LockWait>) {
        self.with(endpoint, |n| n.waits = waits);
    }

    /// The reason and SQLSTATE the rollback of `txn` at `endpoint` carried, if one came.
    pub fn abort_cause(&self, endpoint: &str, txn: TxnId) -> Option<(String, String)> {
        self.with(endpoint, |n| n.causes.get(&txn).cloned())
    }

    fn with<T>(&self, endpoint: &str, f: impl FnOnce(&mut Node) -> T) -> T {
        f(self
            .nodes
            .lock()
            .unwrap()
            .entry(endpoint.to_string())
            .or_default())
    }
}

/// Waits out the caller's timeout, as a call to a participant that never answers does.
async fn silence(timeout: Duration) {
    tokio::time::sleep(timeout).await;
}

impl Participants for FakeParticipants {
    async fn prepare(&self, endpoint: &str, txn: TxnId, timeout: Duration) -> Vote {
        let (behaviour, vote) = self.with(endpoint, |n| {
            n.calls.push(Call::Prepare(txn));
            let b = n.behaviour;
            if b.down {
                return (b, None);
            }
            let vote = match b.prepare {
                // A repeated Prepare answers as before.
                _ if n.prepared.contains_key(&txn) => Some(Vote::Yes {
                    xid: n.prepared[&txn],
                }),
                OnPrepare::Yes | OnPrepare::LoseReply => {
                    n.next_xid += 1;
                    n.prepared.insert(txn, n.next_xid);
                    Some(Vote::Yes { xid: n.next_xid })
                }
                OnPrepare::ReadOnly => Some(Vote::ReadOnly),
                OnPrepare::No => Some(Vote::No {
                    reason: "ERROR deferred constraint (SQLSTATE 23503)".into(),
                }),
                OnPrepare::Hang => None,
            };
            (b, vote)
        });
        match (behaviour, vote) {
            (b, _) if b.down => Vote::No {
                reason: format!("prepare at {endpoint} failed: connection refused"),
            },
            (
                Behaviour {
                    prepare: OnPrepare::LoseReply | OnPrepare::Hang,
                    ..
                },
                _,
            )
            | (_, None) => {
                silence(timeout).await;
                Vote::No {
                    reason: format!("no vote from {endpoint} within {timeout:?}"),
                }
            }
            (_, Some(vote)) => vote,
        }
    }

    async fn finish(
        &self,
        endpoint: &str,
        txn: TxnId,
        _xid: u64,
        ending: &Ending,
        timeout: Duration,
    ) -> Result<(), PeerError> {
        let commit = ending.is_commit();
        let result = self.with(endpoint, |n| {
            if let Ending::RollBack { reason, sqlstate } = ending {
                n.causes.insert(txn, (reason.clone(), sqlstate.clone()));
            }
            n.calls.push(if commit {
                Call::Commit(txn)
            } else {
                Call::Rollback(txn)
            });
            let b = n.behaviour;
            if b.down {
                return Err(PeerError::Unreachable("connection refused".into()));
            }
            match b.finish {
                OnFinish::Hang => return Ok(false),
                OnFinish::Unreachable => {
                    return Err(PeerError::Unreachable(format!(
                        "PostgreSQL at {endpoint} is not available"
                    )));
                }
                OnFinish::Ack | OnFinish::LoseReply => {}
            }
            // Like COMMIT/ROLLBACK PREPARED followed by the pg_xact_status check when the gid
            // is gone: a repeat is fine, a contradiction is refused.
            let result = if n.prepared.remove(&txn).is_some() {
                if commit {
                    n.committed.insert(txn);
                } else {
                    n.rolled_back.insert(txn);
                }
                Ok(())
            } else if commit && !n.committed.contains(&txn) {
                if n.rolled_back.contains(&txn) {
                    n.alarms += 1;
                }
                Err(PeerError::Refused(format!(
                    "{txn} is not prepared at {endpoint}, and it did not commit"
                )))
            } else if !commit && n.committed.contains(&txn) {
                n.alarms += 1;
                Err(PeerError::Refused(format!(
                    "{txn} committed at {endpoint}: it cannot be rolled back"
                )))
            } else {
                Ok(())
            };
            result.map(|()| b.finish == OnFinish::Ack)
        });
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                silence(timeout).await;
                Err(PeerError::Unreachable(format!(
                    "no answer from {endpoint} within {timeout:?}"
                )))
            }
            Err(e) => Err(e),
        }
    }

    async fn health(&self, endpoint: &str, _timeout: Duration) -> Health {
        self.with(endpoint, |n| match n.behaviour.down {
            true => Health::Unreachable("connection refused".into()),
            false => Health::Serving,
        })
    }

    async fn waits(
        &self,
        endpoint: &str,
        min_wait: Duration,
        _timeout: Duration,
    ) -> Result<Vec<LockWait>, PeerError> {
        self.with(endpoint, |n| {
            if n.behaviour.down {
                return Err(PeerError::Unreachable("connection refused".into()));
            }
            Ok(n.waits
                .iter()
                .filter(|w| u128::from(w.waited_ms) >= min_wait.as_millis())
                .cloned()
                .collect())
        })
    }

    async fn commit_one_phase(
        &self,
        endpoint: &str,
        txn: TxnId,
        forget: &[TxnId],
        timeout: Duration,
    ) -> Result<OnePhaseOutcome, PeerError> {
        let answer = self.with(endpoint, |n| {
            n.calls.push(Call::CommitOnePhase(txn, forget.to_vec()));
            let b = n.behaviour;
            if b.down {
                return Err(PeerError::Unreachable("connection refused".into()));
            }
            match b.one_phase {
                OnOnePhase::Hang => return Ok(None),
                OnOnePhase::Unreachable => {
                    return Err(PeerError::Unreachable(format!(
                        "PostgreSQL at {endpoint} is not available"
                    )));
                }
                _ => {}
            }
            if n.prepared.contains_key(&txn) {
                n.alarms += 1;
                return Err(PeerError::Refused(format!(
                    "{txn} is prepared at {endpoint}: it is not a one-phase branch"
                )));
            }
            // Like the participant: a finished branch is answered from the database (marker
            // or fence), an open one is committed now.
            let answer = if n.committed.contains(&txn) {
                OnePhaseOutcome::Committed { read_only: false }
            } else if n.rolled_back.contains(&txn) || n.lost.contains(&txn) {
                n.rolled_back.insert(txn);
                OnePhaseOutcome::Aborted {
                    reason: format!("{txn} is not open at {endpoint} and did not commit"),
                }
            } else if b.one_phase == OnOnePhase::Refuse {
                n.rolled_back.insert(txn);
                OnePhaseOutcome::Aborted {
                    reason: "ERROR deferred constraint (SQLSTATE 23503)".into(),
                }
            } else {
                n.committed.insert(txn);
                n.markers.insert(txn);
                for f in forget {
                    n.markers.remove(f);
                }
                OnePhaseOutcome::Committed { read_only: false }
            };
            Ok((b.one_phase != OnOnePhase::LoseReply).then_some(answer))
        });
        match answer {
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => {
                silence(timeout).await;
                Err(PeerError::Unreachable(format!(
                    "no answer from {endpoint} within {timeout:?}"
                )))
            }
            Err(e) => Err(e),
        }
    }

    async fn saga_step(
        &self,
        endpoint: &str,
        step: SagaStepRequest,
        _timeout: Duration,
    ) -> Result<SagaStepResponse, PeerError> {
        use crate::proto::{SagaOp, SagaStepOutcome as Outcome};
        self.with(endpoint, |n| {
            if n.behaviour.down {
                return Err(PeerError::Unreachable("connection refused".into()));
            }
            let answer = |outcome: Outcome, output| SagaStepResponse {
                outcome: outcome as i32,
                output,
                ..Default::default()
            };
            let applied = |compensation| Applied {
                saga_id: step.saga_id.clone(),
                step: step.step.clone(),
                compensation,
            };
            Ok(match step.op() {
                SagaOp::Action => match n.barrier.get(&step.action_secret) {
                    Some(BarrierRow::Fence) => answer(Outcome::Fenced, None),
                    Some(BarrierRow::Action(out)) => answer(Outcome::Repeated, out.clone()),
                    Some(BarrierRow::Compensate) | None if n.failing_steps.contains(&step.step) => {
                        SagaStepResponse {
                            outcome: Outcome::Failed as i32,
                            error: "new row violates check constraint".into(),
                            sqlstate: "23514".into(),
                            ..Default::default()
                        }
                    }
                    _ => {
                        let out = crate::proto::StatementResult {
                            rows_affected: 1,
                            columns: vec!["step".into()],
                            rows: vec![crate::proto::Row {
                                values: vec![crate::participant::wire::value(
                                    crate::participant::statement::Datum::Text(step.step.clone()),
                                )],
                            }],
                        };
                        n.barrier.insert(
                            step.action_secret.clone(),
                            BarrierRow::Action(Some(out.clone())),
                        );
                        n.applied.push(applied(false));
                        answer(Outcome::Applied, Some(out))
                    }
                },
                SagaOp::Compensate if n.compensations_down => {
                    return Err(PeerError::Unreachable("connection refused".into()));
                }
                SagaOp::Compensate => {
                    if n.barrier.contains_key(&step.compensation_secret) {
                        answer(Outcome::Repeated, None)
                    } else {
                        n.barrier
                            .insert(step.compensation_secret.clone(), BarrierRow::Compensate);
                        if n.barrier.contains_key(&step.action_secret) {
                            n.applied.push(applied(true));
                            answer(Outcome::Applied, None)
                        } else {
                            n.barrier
                                .insert(step.action_secret.clone(), BarrierRow::Fence);
                            answer(Outcome::Null, None)
                        }
                    }
                }
                SagaOp::Forget => {
                    n.barrier.remove(&step.action_secret);
                    n.barrier.remove(&step.compensation_secret);
                    answer(Outcome::Applied, None)
                }
                SagaOp::Unspecified => return Err(PeerError::Refused("no op".into())),
            })
        })
    }

    /// A service with a barrier of its own behaves as a participant's: the same in-memory
    /// barrier, a failing step as FAILED_PRECONDITION, down as UNAVAILABLE.
    async fn call_service(
        &self,
        call: ServiceCall,
        timeout: Duration,
    ) -> Result<Vec<u8>, tonic::Status> {
        use crate::proto::{SagaOp, SagaStepOutcome as Outcome};
        let step = SagaStepRequest {
            saga_id: call.saga_id,
            step: call.step,
            op: if call.compensate {
                SagaOp::Compensate
            } else {
                SagaOp::Action
            } as i32,
            action_secret: call.action_secret,
            compensation_secret: call.compensation_secret.unwrap_or_default(),
            ..Default::default()
        };
        let resp = self
            .saga_step(&call.endpoint, step, timeout)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        match resp.outcome() {
            Outcome::Failed => Err(tonic::Status::failed_precondition(resp.error)),
            Outcome::Fenced => Err(tonic::Status::failed_precondition(
                "compensated before it ran",
            )),
            _ => Ok(call.request),
        }
    }

    async fn recover(&self, endpoint: &str, _timeout: Duration) -> Result<Vec<TxnId>, PeerError> {
        self.with(endpoint, |n| {
            n.calls.push(Call::Recover);
            if n.behaviour.down {
                return Err(PeerError::Unreachable("connection refused".into()));
            }
            Ok(n.prepared.keys().copied().collect())
        })
    }
}
