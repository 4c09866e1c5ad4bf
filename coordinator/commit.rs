//! Driving two-phase commit: the I/O around the [`Txn`] state machine.
//!
//! Each protocol run happens in its own task, never in the RPC handler: tonic drops a handler's
//! future when the client cancels or its deadline passes, and a commit must not stop between
//! its decision and its phase 2. Handlers only wait on the transaction's progress channel.
//!
//! The order of one commit, and what a crash between two steps means:
//! 1. Prepare goes to every branch at once.    crash → no record: presumed abort.
//! 2. Every vote is in; the decision is made under the transaction's lock.
//! 3. A commit decision is written to the log, 4. flushed (group commit).
//!    crash before 4 completes → the record may be lost: presumed abort, and nobody was told.
//! 5. The outcome is announced: Commit, Abort and QueryOutcome may now say "committed".
//! 6. COMMIT PREPARED goes to every prepared branch, retried with backoff until acknowledged.
//!    crash → recovery finds the commit record and re-drives it.
//! 7. All acknowledged: the final record is written (not forced) and the txn leaves memory.
//!
//! A lone branch whose participant can commit in one phase skips all of that (`run_one_phase`,
//! and docs/PROTOCOL.md "One-phase commit of a lone branch" for its crash table):
//! 1. The OnePhase record is written and flushed: from here on, never presumed aborted.
//! 2. CommitOnePhase goes to the participant, retried with backoff until it answers; its
//!    answer is the outcome (a repeat is answered from its database, so it is the truth).
//! 3. The outcome is announced, the final record written (not forced), and the txn id queued
//!    so that the participant may forget its marker once that record is durable.

use super::error::Error;
use super::log::Log;
use super::participants::{Ending, Participants, PeerError};
use super::transactions::{Coordinator, Live, now_ms};
use super::txn::{Decision, OnAbort, OnCommit, OnResolve, OnePhaseOutcome, Outcome, State, Txn};
use crate::process::backoff::Backoff;
use crate::proto::TxnId;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Commit's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitResult {
    pub outcome: Outcome,
    pub reason: String,
    /// Committed, but some branch has not acknowledged yet; retries go on in the background.
    pub branches_pending: bool,
}

impl<L: Log, P: Participants> Coordinator<L, P> {
    /// Runs two-phase commit, or joins the run already under way, and waits for its outcome.
    /// Waits at most `wait` for phase 2 once the outcome is known.
    pub async fn commit(
        self: &Arc<Self>,
        id: TxnId,
        wait: Duration,
    ) -> Result<CommitResult, Error> {
        let Some(live) = self.live(id) else {
            return self.recorded(id);
        };
        let step = live.txn.lock().unwrap().commit(self.limits.one_phase);
        match step {
            OnCommit::OnePhase(_) => {
                tracing::debug!(txn_id = %id, "commit: one phase");
                let this = Arc::clone(self);
                let run = Arc::clone(&live);
                let span = live.span("commit");
                tokio::spawn(async move { this.run_one_phase(run, true).await }.instrument(span));
            }
            OnCommit::Prepare(branches) => {
                tracing::debug!(txn_id = %id, branches = branches.len(), "commit: phase 1");
                let this = Arc::clone(self);
                let run = Arc::clone(&live);
                let span = live.span("commit");
                tokio::spawn(async move { this.run_commit(run, branches).await }.instrument(span));
            }
            OnCommit::Wait | OnCommit::Decided(_) => {}
        }
        self.wait_for_outcome(&live, wait).await
    }

    /// [`Coordinator::commit`] for a client that names the participants it sent statements
    /// to (`named`, docs/PROTOCOL.md §12): another set than the branches aborts instead, and
    /// an id the coordinator does not know is presumed aborted (or, naming none, committed:
    /// nothing ran) instead of NOT_FOUND.
    pub async fn commit_named(
        self: &Arc<Self>,
        id: TxnId,
        named: Option<&[String]>,
        wait: Duration,
    ) -> Result<CommitResult, Error> {
        let Some(names) = named else {
            return self.commit(id, wait).await;
        };
        loop {
            if let Some(live) = self.live(id) {
                if self.start_abort(&live, |txn| txn.abort_unnamed(names, now_ms())) {
                    tracing::info!(txn_id = %id, "commit named other participants than the branches: aborting");
                    return self.wait_for_outcome(&live, Duration::ZERO).await;
                }
                return self.commit(id, wait).await;
            }
            match self.recorded(id) {
                Err(Error::NotFound(_)) => {
                    let committed = names.is_empty();
                    let reason = match committed {
                        true => String::new(),
                        false => format!(
                            "the coordinator has no record of transaction {id}: its enlistments were lost in a coordinator restart (or never arrived), so it is presumed aborted"
                        ),
                    };
                    if self.settle_unknown(id, committed, &reason)? {
                        return Ok(CommitResult {
                            outcome: if committed {
                                Outcome::Committed
                            } else {
                                Outcome::Aborted
                            },
                            reason,
                            branches_pending: false,
                        });
                    }
                    // An enlistment got in first: answer from the transaction it made.
                }
                recorded => return recorded,
            }
        }
    }

    /// Aborts unless already decided, and returns the outcome.
    pub async fn abort(self: &Arc<Self>, id: TxnId, reason: &str) -> Result<Outcome, Error> {
        self.abort_in(id, None, reason).await
    }

    /// [`Coordinator::abort`] for a client that chose the id itself (`epoch` set): an id not
    /// known yet is recorded as aborted, so that no enlistment still on its way can create it
    /// (`transactions.rs`, `settle_unknown`).
    pub async fn abort_in(
        self: &Arc<Self>,
        id: TxnId,
        epoch: Option<u64>,
        reason: &str,
    ) -> Result<Outcome, Error> {
        super::transactions::bounded("reason", reason, super::transactions::MAX_TEXT)?;
        let reason = if reason.is_empty() {
            "aborted by the client"
        } else {
            reason
        };
        let live = loop {
            if let Some(live) = self.live(id) {
                break live;
            }
            match (self.recorded(id), epoch) {
                (Err(Error::NotFound(_)), Some(_)) => {
                    if self.settle_unknown(id, false, reason)? {
                        return Ok(Outcome::Aborted);
                    }
                    // An enlistment got in first: abort the transaction it made.
                }
                (recorded, _) => return recorded.map(|r| r.outcome),
            }
        };
        let _ = self.start_abort(&live, |txn| Some(txn.abort(reason, now_ms())));
        Ok(self.wait_for_outcome(&live, Duration::ZERO).await?.outcome)
    }

    /// The deadline passed: abort if nobody has called Commit yet.
    pub(super) fn expire(self: &Arc<Self>, id: TxnId) {
        if let Some(live) = self.live(id) {
            let _ = self.start_abort(&live, |txn| {
                let step = txn.expire(now_ms());
                if step.is_some() {
                    tracing::info!(txn_id = %txn.id, "deadline exceeded while active: aborting");
                }
                step
            });
        }
    }

    /// Applies an abort transition under the transaction's lock (so a Commit cannot slip in
    /// between its check and its effect), and starts the rollbacks it asks for. Returns
    /// whether it aborted the transaction.
    pub(super) fn start_abort(
        self: &Arc<Self>,
        live: &Arc<Live>,
        transition: impl FnOnce(&mut Txn) -> Option<OnAbort>,
    ) -> bool {
        let step = {
            let mut txn = live.txn.lock().unwrap();
            let step = transition(&mut txn);
            if matches!(step, Some(OnAbort::RollBack(_))) {
                self.put(&txn);
            }
            step
        };
        if let Some(OnAbort::RollBack(_)) = step {
            // An abort needs no forced write: without a commit record it is the presumption.
            live.announce(Outcome::Aborted);
            metrics::counter!("twopc_transactions_total", "outcome" => "aborted").increment(1);
            let this = Arc::clone(self);
            let live = Arc::clone(live);
            let span = live.span("abort");
            tokio::spawn(async move { this.finish_branches(live).await }.instrument(span));
            return true;
        }
        false
    }

    /// The outcome of a transaction that is no longer live, from its record.
    fn recorded(&self, id: TxnId) -> Result<CommitResult, Error> {
        let txn = self.log.get(id)?.ok_or(Error::NotFound(id))?.settle();
        Ok(CommitResult {
            outcome: txn.state.outcome(),
            reason: txn.reason,
            branches_pending: txn.state == State::Committing,
        })
    }

    async fn wait_for_outcome(
        &self,
        live: &Live,
        phase2_wait: Duration,
    ) -> Result<CommitResult, Error> {
        let mut progress = live.progress.subscribe();
        let delegated = live.txn.lock().unwrap().state == State::OnePhase;
        let announced = progress.wait_for(|p| p.announced != Outcome::Pending);
        if delegated {
            // Only the participant can tell, and it may be down for long: the caller hears so
            // and asks again, while the driver keeps asking the participant. Long enough for
            // one lost reply and its retry.
            let bound = self.limits.prepare_timeout + self.limits.commit_wait;
            if tokio::time::timeout(bound, announced).await.is_err() {
                let txn = live.txn.lock().unwrap();
                return Err(Error::OutcomeAtParticipant {
                    id: txn.id,
                    participant_id: txn.branches[0].participant_id.clone(),
                    last_error: if txn.unanswered.is_empty() {
                        "its answer is still on the way".into()
                    } else {
                        txn.unanswered.clone()
                    },
                });
            }
        } else {
            // The outcome always comes: phase 1 is bounded by the prepare timeout.
            let _ = announced.await;
        }
        // Waiting for phase 2 lets a committer read its own writes; an abort's rollbacks
        // change nothing the caller can see, so its answer need not wait for them.
        if progress.borrow().announced == Outcome::Committed {
            let _ = tokio::time::timeout(phase2_wait, progress.wait_for(|p| p.finished)).await;
        }
        let p = *progress.borrow();
        let txn = live.txn.lock().unwrap();
        Ok(CommitResult {
            outcome: p.announced,
            reason: txn.reason.clone(),
            branches_pending: p.announced == Outcome::Committed && !p.finished,
        })
    }

    /// One-phase commit of a lone branch: the delegation made durable, CommitOnePhase until
    /// the participant answers, and its answer recorded as the outcome. `fresh`: Commit just
    /// delegated it (a recovered record is on disk already).
    pub(super) async fn run_one_phase(self: Arc<Self>, live: Arc<Live>, fresh: bool) {
        let (id, endpoint) = {
            let txn = live.txn.lock().unwrap();
            if fresh {
                self.put(&txn);
            }
            (txn.id, txn.branches[0].endpoint.clone())
        };
        if fresh {
            crate::failpoint!("coordinator::one_phase_written");
        }
        // Every record written before this flush is durable after it, so the markers of the
        // transactions queued by now may go.
        let forget = self.take_forgettable(&endpoint);
        let flushing = std::time::Instant::now();
        self.sync().await;
        metrics::histogram!("twopc_phase_duration_seconds", "phase" => "decision_flush")
            .record(flushing.elapsed());
        crate::failpoint!("coordinator::one_phase_flushed");

        let started = std::time::Instant::now();
        let mut backoff = Backoff::new(self.limits.retry_min, self.limits.retry_max);
        let answer = loop {
            match self
                .participants
                .commit_one_phase(&endpoint, id, &forget, self.limits.prepare_timeout)
                .await
            {
                Ok(answer) => break answer,
                Err(e) => {
                    let attempts = backoff.waits() + 1;
                    if attempts == 1 || attempts.is_power_of_two() {
                        tracing::warn!(txn_id = %id, endpoint, attempts, error = %e, "CommitOnePhase got no answer; asking again");
                    }
                    live.txn.lock().unwrap().unanswered = e.to_string();
                }
            }
            backoff.wait().await;
        };
        metrics::histogram!("twopc_phase_duration_seconds", "phase" => "one_phase")
            .record(started.elapsed());
        crate::failpoint!("coordinator::one_phase_answered");

        let done = {
            let mut txn = live.txn.lock().unwrap();
            txn.one_phase_answered(&answer, now_ms());
            txn.clone()
        };
        let outcome = done.state.outcome();
        live.announce(outcome);
        metrics::counter!("twopc_transactions_total", "outcome" => outcome_label(outcome))
            .increment(1);
        self.retire(&live, &done);
        match answer {
            OnePhaseOutcome::Committed { read_only: false } => {
                self.queue_forgettable(&endpoint, &[id])
            }
            // Its local transaction rolled back, and the deletes with it: ask again next time.
            OnePhaseOutcome::Aborted { .. } => self.queue_forgettable(&endpoint, &forget),
            OnePhaseOutcome::Committed { read_only: true } => {}
        }
    }

    /// The markers `endpoint` may forget: at most `FORGET_PER_REQUEST` of the queue.
    fn take_forgettable(&self, endpoint: &str) -> Vec<TxnId> {
        let mut queues = self.forgettable.lock().unwrap();
        let Some(queue) = queues.get_mut(endpoint) else {
            return Vec::new();
        };
        let n = queue.len().min(FORGET_PER_REQUEST);
        queue.drain(..n).collect()
    }

    fn queue_forgettable(&self, endpoint: &str, ids: &[TxnId]) {
        if ids.is_empty() {
            return;
        }
        let mut queues = self.forgettable.lock().unwrap();
        let queue = queues.entry(endpoint.to_string()).or_default();
        queue.extend_from_slice(ids);
        // With no more one-phase traffic to carry them, markers are left to the
        // participant's age-based pruning; memory here stays bounded.
        if queue.len() > FORGET_QUEUE_MAX {
            let excess = queue.len() - FORGET_QUEUE_MAX;
            queue.drain(..excess);
        }
    }

    /// Phase 1, the decision, and phase 2.
    async fn run_commit(self: Arc<Self>, live: Arc<Live>, branches: Vec<usize>) {
        let (id, endpoints) = {
            let txn = live.txn.lock().unwrap();
            let eps: Vec<String> = branches
                .iter()
                .map(|&i| txn.branches[i].endpoint.clone())
                .collect();
            (txn.id, eps)
        };
        let timeout = self.limits.prepare_timeout;
        let started = std::time::Instant::now();
        let participants = &self.participants;
        let votes = futures::future::join_all(endpoints.iter().map(|ep| async move {
            crate::failpoint!("coordinator::prepare_sent");
            participants.prepare(ep, id, timeout).await
        }))
        .await;
        crate::failpoint!("coordinator::votes_in");
        metrics::histogram!("twopc_phase_duration_seconds", "phase" => "prepare")
            .record(started.elapsed());

        let decision = {
            let mut txn = live.txn.lock().unwrap();
            for (&i, vote) in branches.iter().zip(votes) {
                txn.record_vote(i, vote);
            }
            let decision = txn.decide(now_ms());
            self.put(&txn);
            decision
        };
        match &decision {
            Decision::Commit { flush } => {
                if *flush {
                    crate::failpoint!("coordinator::decision_written");
                    let flushing = std::time::Instant::now();
                    self.sync().await;
                    metrics::histogram!("twopc_phase_duration_seconds", "phase" => "decision_flush")
                        .record(flushing.elapsed());
                    crate::failpoint!("coordinator::decision_flushed");
                }
                tracing::debug!(txn_id = %id, "commit decided");
            }
            Decision::Abort { reason } => tracing::info!(txn_id = %id, reason, "abort decided"),
            Decision::OnePhase => unreachable!("decide() never delegates: commit() does"),
        }
        let outcome = decision.outcome();
        live.announce(outcome);
        if outcome == Outcome::Committed {
            crate::failpoint!("coordinator::announced");
        }
        metrics::counter!("twopc_transactions_total", "outcome" => outcome_label(outcome))
            .increment(1);
        let finishing = std::time::Instant::now();
        self.finish_branches(live).await;
        metrics::histogram!("twopc_phase_duration_seconds", "phase" => "finish")
            .record(finishing.elapsed());
    }

    /// Phase 2: COMMIT PREPARED or rollback to every branch that needs it, each retried with
    /// backoff until it is acknowledged, then the transaction retires.
    pub(super) async fn finish_branches(self: Arc<Self>, live: Arc<Live>) {
        let (id, committing, targets) = {
            let txn = live.txn.lock().unwrap();
            if txn.state.is_final() {
                drop(txn);
                let txn = live.txn.lock().unwrap().clone();
                self.retire(&live, &txn);
                return;
            }
            let targets: Vec<(usize, String, u64)> = txn
                .branches_to_finish()
                .into_iter()
                .map(|i| (i, txn.branches[i].endpoint.clone(), txn.branches[i].xid))
                .collect();
            (txn.id, txn.state == State::Committing, targets)
        };
        let this = &self;
        let live_ref = &live;
        futures::future::join_all(targets.into_iter().map(|(i, endpoint, xid)| async move {
            let delivery = this
                .finish_one(live_ref, id, &endpoint, xid, committing)
                .await;
            let mut txn = live_ref.txn.lock().unwrap();
            if txn.state.is_final() {
                // An operator resolved it meanwhile (ResolveTransaction).
                return;
            }
            let finished = match delivery {
                Delivery::Acked => txn.acked(i, now_ms()),
                Delivery::GivenUp => {
                    let finished = txn.abandon(i, now_ms());
                    drop(txn);
                    crate::failpoint!("coordinator::rollback_abandoned");
                    txn = live_ref.txn.lock().unwrap();
                    finished
                }
                Delivery::Resolved => return,
            };
            if finished {
                let done: Txn = txn.clone();
                drop(txn);
                if committing {
                    crate::failpoint!("coordinator::before_complete");
                }
                this.retire(live_ref, &done);
            } else if committing {
                drop(txn);
                crate::failpoint!("coordinator::first_commit_acked");
            }
        }))
        .await;
    }

    /// Retries until the branch acknowledges, an operator has resolved the transaction by
    /// hand, or (a rollback only) its participant stayed unreachable past
    /// `Limits::rollback_retry_for` (`Txn::may_abandon`).
    async fn finish_one(
        &self,
        live: &Live,
        id: TxnId,
        endpoint: &str,
        xid: u64,
        commit: bool,
    ) -> Delivery {
        let ending = if commit {
            Ending::Commit
        } else {
            let txn = live.txn.lock().unwrap();
            Ending::RollBack {
                reason: txn.reason.clone(),
                sqlstate: txn.sqlstate.clone(),
            }
        };
        let mut backoff = Backoff::new(self.limits.retry_min, self.limits.retry_max);
        loop {
            if live.txn.lock().unwrap().state.is_final() {
                return Delivery::Resolved;
            }
            match self
                .participants
                .finish(endpoint, id, xid, &ending, self.limits.prepare_timeout)
                .await
            {
                Ok(()) => return Delivery::Acked,
                Err(PeerError::Unreachable(error))
                    if live
                        .txn
                        .lock()
                        .unwrap()
                        .may_abandon(now_ms(), self.limits.rollback_retry_for) =>
                {
                    metrics::counter!("twopc_rollbacks_abandoned_total").increment(1);
                    tracing::warn!(txn_id = %id, endpoint, attempts = backoff.waits() + 1, error,
                        "rollback abandoned: the participant stayed unreachable past --rollback-retry-for-ms; if it still holds the branch prepared, its resolver will roll it back (presumed abort)");
                    return Delivery::GivenUp;
                }
                Err(e) => {
                    let attempts = backoff.waits() + 1;
                    let what = if commit {
                        "COMMIT PREPARED"
                    } else {
                        "rollback"
                    };
                    match e {
                        PeerError::Refused(error) => {
                            tracing::error!(txn_id = %id, endpoint, error, "{what} refused: the branch did not finish the way it was decided")
                        }
                        PeerError::Unreachable(error)
                            if attempts == 1 || attempts.is_power_of_two() =>
                        {
                            tracing::warn!(txn_id = %id, endpoint, attempts, error, "{what} failed; retrying")
                        }
                        PeerError::Unreachable(_) => {}
                    }
                }
            }
            backoff.wait().await;
        }
    }

    /// An operator's resolution of a transaction stuck in phase 2 (see `Txn::resolve` and
    /// `Txn::force`). An active transaction is aborted first, so FORCE_ABORT also ends one whose
    /// rollbacks cannot land.
    pub async fn resolve(
        self: &Arc<Self>,
        id: TxnId,
        commit: bool,
        operator: &str,
        reason: &str,
    ) -> Result<(), Error> {
        super::transactions::bounded("operator", operator, super::transactions::MAX_TEXT)?;
        super::transactions::bounded("reason", reason, super::transactions::MAX_TEXT)?;
        let Some(live) = self.live(id) else {
            // Not live: finished, or a previous run's. Either way only a repeat of how it
            // ended is accepted (nothing is left to force).
            let txn = self.log.get(id)?.ok_or(Error::NotFound(id))?.settle();
            txn.resolve(commit)?;
            return Ok(());
        };
        let step = live.txn.lock().unwrap().resolve(commit)?;
        match step {
            OnResolve::Abort => {
                self.start_abort(&live, |txn| {
                    Some(txn.abort("aborted by an operator", now_ms()))
                });
                self.wait_for_outcome(&live, Duration::ZERO).await?;
                tracing::warn!(audit = true, txn_id = %id, operator, reason, "operator aborted a transaction");
                return Ok(());
            }
            OnResolve::WaitThenForce => {
                self.wait_for_outcome(&live, Duration::ZERO).await?;
            }
            OnResolve::Force => {}
        }
        let done = {
            let mut txn = live.txn.lock().unwrap();
            let declared = txn.force(commit, now_ms())?;
            if declared.is_empty() {
                return Ok(());
            }
            tracing::warn!(
                audit = true,
                txn_id = %id,
                operator,
                reason,
                resolution = if commit { "force-commit" } else { "force-abort" },
                pending = ?declared,
                "operator resolved a transaction by hand: the listed branches are declared finished"
            );
            txn.state.is_final().then(|| txn.clone())
        };
        if let Some(txn) = done {
            self.retire(&live, &txn);
        }
        Ok(())
    }
}

/// How many forgettable markers one CommitOnePhase carries.
const FORGET_PER_REQUEST: usize = 1000;
/// How many are kept waiting per participant.
const FORGET_QUEUE_MAX: usize = 100_000;

/// The metric label of a decided outcome.
/// How one branch's phase 2 ended.
enum Delivery {
    /// The participant acknowledged it.
    Acked,
    /// A rollback its participant could not be reached for (`Txn::may_abandon`).
    GivenUp,
    /// An operator finished the transaction by hand meanwhile.
    Resolved,
}

fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Committed => "committed",
        Outcome::Aborted => "aborted",
        Outcome::Pending => "pending",
    }
}
