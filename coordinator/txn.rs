//! A global transaction as the coordinator sees it: a state machine that does no I/O.
//!
//! ```text
//!            commit()                all yes            all acked
//!  Active ───────────▶ Preparing ───────────▶ Committing ─────────▶ Committed
//!    │                     │   (decision logged + flushed)
//!    │ abort() / deadline  │ a no, an error, a timeout, or abort()
//!    ▼                     ▼
//!  Aborting ◀──────────────┘ ────────────────────────────────────▶ Aborted
//!                                          all acked
//!
//!            commit(), one branch            the participant's answer
//!  Active ─────────────────────▶ OnePhase ──────────────────────────▶ Committed / Aborted
//!               (logged + flushed before CommitOnePhase is sent)
//! ```
//!
//! Every transition and every rule of the protocol lives here: the drivers (`commit.rs`,
//! `recovery.rs`) ask this machine what to do next, perform the I/O, and feed the results back;
//! they never assign a state. Keeping the rules here means a crash-by-crash test needs no
//! network, no sled and no PostgreSQL: see the tests at the bottom, and the driver scenarios in
//! `scenarios.rs`.

use crate::proto::TxnId;
pub use crate::proto::vote::{OnePhaseOutcome, Vote};
use serde::{Deserialize, Serialize};

/// PostgreSQL's deadlock_detected: a distributed deadlock's victim fails with it too, so a
/// client retries it as it would a local deadlock.
pub const DEADLOCK_SQLSTATE: &str = "40P01";

/// Where a transaction is in the protocol. Stored in the log, so the names are its format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Begun; branches enlist and run statements.
    Active,
    /// Commit was called: votes are coming in. Never logged as such (see `log.rs`).
    Preparing,
    /// Commit was called on a lone branch whose participant commits in one phase: the decision
    /// is that participant's COMMIT. Logged and flushed before the request goes out, and never
    /// presumed aborted, since the branch may have committed (docs/PROTOCOL.md, "One-phase
    /// commit of a lone branch").
    OnePhase,
    /// The decision is commit; COMMIT PREPARED goes to every prepared branch until acked.
    Committing,
    Committed,
    /// The decision is abort; rollbacks go to every branch that may hold anything.
    Aborting,
    Aborted,
}

impl State {
    /// Nothing more will happen to a transaction in a final state.
    pub fn is_final(self) -> bool {
        matches!(self, State::Committed | State::Aborted)
    }

    /// The decision is commit. (Whether it may be *announced* yet is the log's business: only
    /// once it is durable, see `Live` in `transactions.rs`.)
    pub fn is_commit(self) -> bool {
        matches!(self, State::Committing | State::Committed)
    }

    /// The outcome this state implies while the transaction is live.
    pub fn outcome(self) -> Outcome {
        match self {
            State::Active | State::Preparing | State::OnePhase => Outcome::Pending,
            s if s.is_commit() => Outcome::Committed,
            _ => Outcome::Aborted,
        }
    }

    /// The state a logged record stands for once its transaction is no longer live. Only a
    /// commit decision is forced to disk; an Active or Preparing record is a previous run's
    /// transaction that never reached one, so it is aborted (presumed abort). A OnePhase record
    /// stays undecided: its outcome is the participant's to tell.
    pub fn settled(self) -> State {
        match self {
            State::Active | State::Preparing => State::Aborted,
            s => s,
        }
    }
}

/// What a caller may be told about a transaction's fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Committed,
    Aborted,
}

/// Where one branch is, as the coordinator knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BranchState {
    /// Enlisted; running statements at its participant.
    Active,
    /// Prepare sent, no vote yet.
    Preparing,
    /// Voted yes: it holds a prepared transaction until phase 2.
    Prepared,
    /// Voted read-only: it finished at its vote.
    ReadOnly,
    /// Voted no, or no vote came (it may still be prepared if the vote was lost).
    Failed,
    Committed,
    RolledBack,
    /// Its rollback could not be delivered within `Limits::rollback_retry_for`, so the
    /// coordinator stopped sending it. Presumed abort makes that safe: if the branch is still
    /// prepared, its participant's resolver asks QueryOutcome and hears ABORTED, from this
    /// record or, once it is pruned, from its absence.
    Abandoned,
}

/// The coordinator's record of one participant's branch of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRecord {
    /// The participant's id, unique among this coordinator's participants.
    pub participant_id: String,
    /// Where phase 1 and 2 reach it.
    pub endpoint: String,
    /// The participant process that registered it.
    #[serde(default)]
    pub instance: String,
    pub state: BranchState,
    /// The branch's PostgreSQL xid8, carried with its yes vote; 0 until then.
    pub xid: u64,
    /// Its participant can commit it in one phase (`Participant.CommitOnePhase`).
    #[serde(default)]
    pub one_phase: bool,
}

/// What the coordinator decided once every vote was in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Commit. `flush`: the decision must be durable before anyone hears of it or any COMMIT
    /// PREPARED goes out. Only a prepared branch can lose a commit, so with none (read-only or
    /// no branches) there is nothing to make durable; and a decision read back from the log
    /// after a restart is durable already.
    Commit {
        flush: bool,
    },
    Abort {
        reason: String,
    },
    /// Delegated to the lone branch's participant (a recovered OnePhase record): ask it again,
    /// with `CommitOnePhase`, until it answers.
    OnePhase,
}

impl Decision {
    pub fn outcome(&self) -> Outcome {
        match self {
            Decision::Commit { .. } => Outcome::Committed,
            Decision::Abort { .. } => Outcome::Aborted,
            Decision::OnePhase => Outcome::Pending,
        }
    }
}

/// What `commit()` asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnCommit {
    /// Send Prepare to these branches (by index) concurrently, then call `decide`.
    Prepare(Vec<usize>),
    /// Make the OnePhase record durable, then send CommitOnePhase to this lone branch and
    /// report its answer to `one_phase_answered`.
    OnePhase(usize),
    /// Someone else's Commit is already running it: wait for the outcome.
    Wait,
    /// Already decided.
    Decided(Outcome),
}

/// What `abort()` asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnAbort {
    /// Aborted now: roll back these branches (by index).
    RollBack(Vec<usize>),
    /// Votes are coming in: the decision will be abort; wait for it.
    Wait,
    /// Already decided.
    Decided(Outcome),
}

/// What an operator's resolution (`resolve()`) asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnResolve {
    /// Undecided, and the operator asks for an abort: an ordinary one, whose rollbacks go out
    /// as usual. Forcing it too would retire it before they are even sent.
    Abort,
    /// Decided commit: wait until the decision is durable (announced), then `force` it. An
    /// operator's ending of a commit is never told before the commit itself is durable.
    WaitThenForce,
    /// `force` it now.
    Force,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    #[error(
        "transaction {id} is {state:?}, not active: {action} is only possible while it is active"
    )]
    NotActive {
        id: TxnId,
        state: State,
        action: &'static str,
    },
    #[error(
        "participant {participant_id:?} is already registered for transaction {id} at {existing}, not {endpoint}"
    )]
    EndpointMismatch {
        id: TxnId,
        participant_id: String,
        existing: String,
        endpoint: String,
    },
    #[error(
        "participant {participant_id:?} restarted since it joined transaction {id}, losing the statements it ran for it; the transaction can only abort"
    )]
    BranchLost { id: TxnId, participant_id: String },
    #[error(
        "transaction {id} is {state:?}: an operator can only finish a transaction the way it was decided (--force-commit for committing, --force-abort otherwise)"
    )]
    CannotForce { id: TxnId, state: State },
    #[error(
        "transaction {id} is being committed in one phase by participant {participant_id:?}: its outcome is that participant's COMMIT, which this coordinator does not know yet; bring the participant back (the coordinator keeps asking it), or ask it with Participant.CommitOnePhase"
    )]
    DelegatedToParticipant { id: TxnId, participant_id: String },
}

/// A global transaction: its state, its branches, and the times and reasons a client or an
/// operator may ask about. This whole struct is the log record (`log.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub id: TxnId,
    /// The client's label, for people reading lists and logs.
    pub label: String,
    /// The token that began it (`--auth-tokens`); empty without authentication.
    #[serde(default)]
    pub begun_by: String,
    pub state: State,
    pub branches: Vec<BranchRecord>,
    pub created_ms: i64,
    /// When an undecided transaction is aborted (Unix ms).
    pub deadline_ms: i64,
    pub decided_ms: i64,
    pub finished_ms: i64,
    /// Why it aborted.
    pub reason: String,
    /// The SQLSTATE of why it aborted, when the cause has one (40P01: a distributed deadlock's
    /// victim); sent with its rollbacks, so that a statement they cancel fails with it.
    #[serde(default)]
    pub sqlstate: String,
    /// An operator declared some branch finished without its acknowledgement: that branch may
    /// still be prepared somewhere, so this record must outlive any retention period.
    #[serde(default)]
    pub forced: bool,
    /// Abort was asked for while votes were coming in; `decide` honours it.
    #[serde(skip)]
    abort_requested: Option<String>,
    /// Why the lone participant of a OnePhase transaction has not answered yet, for callers
    /// who are told to ask again.
    #[serde(skip)]
    pub unanswered: String,
}

impl Txn {
    pub fn begin(id: TxnId, label: String, created_ms: i64, deadline_ms: i64) -> Self {
        Txn {
            id,
            label,
            begun_by: String::new(),
            state: State::Active,
            branches: Vec::new(),
            created_ms,
            deadline_ms,
            decided_ms: 0,
            finished_ms: 0,
            reason: String::new(),
            sqlstate: String::new(),
            forced: false,
            abort_requested: None,
            unanswered: String::new(),
        }
    }

    /// Enlists a participant. Registering the same participant again is a no-op, so a
    /// participant may retry after a lost reply. Returns whether the branch is new.
    ///
    /// `instance` names the participant process: the same participant coming back as a new
    /// process has lost the branch's open PostgreSQL transaction and every statement in it, so
    /// it must not carry on as if nothing happened.
    pub fn register(
        &mut self,
        participant_id: &str,
        endpoint: &str,
        instance: &str,
        one_phase: bool,
    ) -> Result<bool, TxnError> {
        if self.state != State::Active {
            return Err(self.not_active("registering a branch"));
        }
        if let Some(existing) = self
            .branches
            .iter()
            .find(|b| b.participant_id == participant_id)
        {
            if existing.endpoint != endpoint {
                return Err(TxnError::EndpointMismatch {
                    id: self.id,
                    participant_id: participant_id.to_string(),
                    existing: existing.endpoint.clone(),
                    endpoint: endpoint.to_string(),
                });
            }
            if existing.instance != instance {
                return Err(TxnError::BranchLost {
                    id: self.id,
                    participant_id: participant_id.to_string(),
                });
            }
            return Ok(false);
        }
        self.branches.push(BranchRecord {
            participant_id: participant_id.to_string(),
            endpoint: endpoint.to_string(),
            instance: instance.to_string(),
            state: BranchState::Active,
            xid: 0,
            one_phase,
        });
        Ok(true)
    }

    /// Commit was called: start phase 1, or report why not. `one_phase_allowed`: this
    /// coordinator commits a lone branch in one phase when its participant can.
    pub fn commit(&mut self, one_phase_allowed: bool) -> OnCommit {
        match self.state {
            State::Active
                if one_phase_allowed && matches!(&self.branches[..], [b] if b.one_phase) =>
            {
                self.state = State::OnePhase;
                self.branches[0].state = BranchState::Preparing;
                OnCommit::OnePhase(0)
            }
            State::Active => {
                self.state = State::Preparing;
                for b in &mut self.branches {
                    b.state = BranchState::Preparing;
                }
                OnCommit::Prepare((0..self.branches.len()).collect())
            }
            State::Preparing | State::OnePhase => OnCommit::Wait,
            s => OnCommit::Decided(s.outcome()),
        }
    }

    /// The lone branch's participant answered CommitOnePhase: its outcome is the
    /// transaction's, final at once (nothing is left to finish).
    pub fn one_phase_answered(&mut self, answer: &OnePhaseOutcome, now_ms: i64) {
        assert_eq!(
            self.state,
            State::OnePhase,
            "one_phase_answered() outside OnePhase"
        );
        self.decided_ms = now_ms;
        self.finished_ms = now_ms;
        // An abort asked for meanwhile could not be honoured: the participant decided.
        self.abort_requested = None;
        match answer {
            OnePhaseOutcome::Committed { read_only } => {
                self.state = State::Committed;
                self.branches[0].state = if *read_only {
                    BranchState::ReadOnly
                } else {
                    BranchState::Committed
                };
            }
            OnePhaseOutcome::Aborted { reason } => {
                self.state = State::Aborted;
                self.branches[0].state = BranchState::RolledBack;
                self.reason = format!(
                    "participant {} did not commit: {reason}",
                    self.branches[0].participant_id
                );
            }
        }
    }

    pub fn record_vote(&mut self, branch: usize, vote: Vote) {
        let b = &mut self.branches[branch];
        match vote {
            Vote::Yes { xid } => {
                b.state = BranchState::Prepared;
                b.xid = xid;
            }
            Vote::ReadOnly => b.state = BranchState::ReadOnly,
            Vote::No { reason } => {
                b.state = BranchState::Failed;
                if self.reason.is_empty() {
                    self.reason = format!("participant {} voted no: {reason}", b.participant_id);
                }
            }
        }
    }

    /// Every vote is in: decide. A commit decision with `flush` must be logged and flushed by
    /// the caller before anyone hears of it.
    pub fn decide(&mut self, now_ms: i64) -> Decision {
        assert_eq!(self.state, State::Preparing, "decide() outside phase 1");
        self.decided_ms = now_ms;
        if let Some(reason) = self.abort_requested.take() {
            self.reason = reason;
        }
        let all_yes = self
            .branches
            .iter()
            .all(|b| matches!(b.state, BranchState::Prepared | BranchState::ReadOnly));
        if all_yes && self.reason.is_empty() {
            self.state = State::Committing;
            let flush = self
                .branches
                .iter()
                .any(|b| b.state == BranchState::Prepared);
            self.finish_if_acked(now_ms);
            Decision::Commit { flush }
        } else {
            if self.reason.is_empty() {
                self.reason = "a participant did not vote".to_string();
            }
            self.state = State::Aborting;
            self.finish_if_acked(now_ms);
            Decision::Abort {
                reason: self.reason.clone(),
            }
        }
    }

    /// Abort was asked for (by a client or an operator).
    pub fn abort(&mut self, reason: &str, now_ms: i64) -> OnAbort {
        match self.state {
            State::Active => {
                self.state = State::Aborting;
                self.reason = reason.to_string();
                self.decided_ms = now_ms;
                let branches = self.branches_to_finish();
                self.finish_if_acked(now_ms);
                OnAbort::RollBack(branches)
            }
            State::Preparing => {
                self.abort_requested
                    .get_or_insert_with(|| reason.to_string());
                OnAbort::Wait
            }
            // Delegated: the participant's COMMIT decides, and an abort cannot overrule it.
            State::OnePhase => OnAbort::Wait,
            s => OnAbort::Decided(s.outcome()),
        }
    }

    /// Chosen as the victim of a distributed deadlock. Only an Active transaction is
    /// aborted: one that is preparing or decided is waiting for no lock a statement of its own
    /// asked for, and its outcome is not the detector's to change. `None`: left alone.
    pub fn abort_victim(&mut self, reason: &str, now_ms: i64) -> Option<OnAbort> {
        (self.state == State::Active).then(|| {
            self.sqlstate = DEADLOCK_SQLSTATE.to_string();
            self.abort(reason, now_ms)
        })
    }

    /// A transaction that ended before anything enlisted in it (`Coordinator::settle_unknown`):
    /// final at once, with no branch.
    pub fn settled_unknown(id: TxnId, committed: bool, reason: &str, now_ms: i64) -> Txn {
        let mut txn = Txn::begin(id, String::new(), now_ms, now_ms);
        txn.state = if committed {
            State::Committed
        } else {
            State::Aborted
        };
        txn.reason = reason.to_string();
        txn.decided_ms = now_ms;
        txn.finished_ms = now_ms;
        txn
    }

    /// Commit named the participants the client sent statements to, and they are not the
    /// enlisted ones: a statement's branch is missing (its enlistment was refused or lost) or
    /// one is there that the client does not know ran. Only an Active transaction is aborted;
    /// a repeated Commit finds it decided. `None`: the same set, or no longer Active.
    pub fn abort_unnamed(&mut self, names: &[String], now_ms: i64) -> Option<OnAbort> {
        if self.state != State::Active {
            return None;
        }
        let reason = self.unnamed(names)?;
        Some(self.abort(&reason, now_ms))
    }

    /// How `names` (participant ids, or the URLs the client called) differ from the branches,
    /// for a person; `None` if they name exactly the branches.
    fn unnamed(&self, names: &[String]) -> Option<String> {
        let url = |s: &str| s.trim_end_matches('/').to_string();
        let names_branch =
            |n: &str, b: &BranchRecord| n == b.participant_id || url(n) == url(&b.endpoint);
        let never_enlisted: Vec<&str> = names
            .iter()
            .filter(|n| !self.branches.iter().any(|b| names_branch(n, b)))
            .map(String::as_str)
            .collect();
        let not_named: Vec<&str> = self
            .branches
            .iter()
            .filter(|b| !names.iter().any(|n| names_branch(n, b)))
            .map(|b| b.participant_id.as_str())
            .collect();
        let mut why = Vec::new();
        if !never_enlisted.is_empty() {
            why.push(format!(
                "the client sent statements to {}, which never enlisted (an enlistment refused or lost, or a call that never arrived)",
                never_enlisted.join(", ")
            ));
        }
        if !not_named.is_empty() {
            why.push(format!(
                "{} enlisted, but the client did not name it (an Execute whose answer it never got?)",
                not_named.join(", ")
            ));
        }
        (!why.is_empty()).then(|| {
            format!(
                "the participants named at Commit are not the transaction's branches: {}",
                why.join("; ")
            )
        })
    }

    /// The deadline passed. Only a transaction nobody has called Commit on is aborted: once
    /// phase 1 has begun, the prepare timeout bounds it instead. `None`: nothing to do.
    pub fn expire(&mut self, now_ms: i64) -> Option<OnAbort> {
        (self.state == State::Active).then(|| self.abort("deadline exceeded while active", now_ms))
    }

    /// The coordinator restarted and found this unfinished record. A durable commit decision
    /// stands, and a delegated one is asked for again; anything else never reached a
    /// decision, so it aborts (presumed abort).
    pub fn recover(&mut self, now_ms: i64) -> Decision {
        match self.state {
            State::Committing => Decision::Commit { flush: false },
            State::OnePhase => Decision::OnePhase,
            State::Active | State::Preparing | State::Aborting => {
                if self.state != State::Aborting {
                    self.state = State::Aborting;
                    self.decided_ms = now_ms;
                    self.reason = "the coordinator restarted before a commit decision".into();
                }
                self.finish_if_acked(now_ms);
                Decision::Abort {
                    reason: self.reason.clone(),
                }
            }
            State::Committed | State::Aborted => panic!("recover() of a finished transaction"),
        }
    }

    /// A logged record whose transaction is no longer live, as it stands for good: see
    /// [`State::settled`].
    pub fn settle(mut self) -> Txn {
        self.state = self.state.settled();
        self
    }

    /// An operator asks to finish the transaction by hand (`commit`: force-commit). Decides how;
    /// a decision is never reversed.
    pub fn resolve(&self, commit: bool) -> Result<OnResolve, TxnError> {
        match (self.state, commit) {
            (State::Active | State::Preparing, false) => Ok(OnResolve::Abort),
            (State::Committing, true) => Ok(OnResolve::WaitThenForce),
            (State::Aborting, false) | (State::Committed, true) | (State::Aborted, false) => {
                Ok(OnResolve::Force)
            }
            (State::OnePhase, _) => Err(TxnError::DelegatedToParticipant {
                id: self.id,
                participant_id: self.branches[0].participant_id.clone(),
            }),
            (state, _) => Err(TxnError::CannotForce { id: self.id, state }),
        }
    }

    /// An operator declares every branch still owed phase 2 finished the way the transaction
    /// was decided (its participant is gone for good), so the transaction can retire. Returns
    /// the participants so declared. A decision is never changed: forcing the other way is
    /// refused.
    pub fn force(&mut self, commit: bool, now_ms: i64) -> Result<Vec<String>, TxnError> {
        match (self.state, commit) {
            (State::Committing, true) | (State::Aborting, false) => {
                let mut declared = Vec::new();
                for i in self.branches_to_finish() {
                    self.forced = true;
                    let branch = &mut self.branches[i];
                    branch.state = if commit {
                        BranchState::Committed
                    } else {
                        BranchState::RolledBack
                    };
                    declared.push(branch.participant_id.clone());
                }
                self.finish_if_acked(now_ms);
                Ok(declared)
            }
            (State::Committed, true) | (State::Aborted, false) => Ok(Vec::new()),
            (state, _) => Err(TxnError::CannotForce { id: self.id, state }),
        }
    }

    /// The branches that still need phase 2 (COMMIT PREPARED or a rollback). A read-only
    /// branch already finished when it voted; a branch that voted no already rolled back, but
    /// one whose vote was lost may be prepared, so it gets a rollback too.
    pub fn branches_to_finish(&self) -> Vec<usize> {
        let committing = self.state == State::Committing;
        (0..self.branches.len())
            .filter(|&i| match self.branches[i].state {
                BranchState::ReadOnly
                | BranchState::Committed
                | BranchState::RolledBack
                | BranchState::Abandoned => false,
                BranchState::Prepared => true,
                _ => !committing,
            })
            .collect()
    }

    /// A branch acknowledged phase 2. Returns true when that finished the transaction.
    pub fn acked(&mut self, branch: usize, now_ms: i64) -> bool {
        self.branches[branch].state = match self.state {
            State::Committing => BranchState::Committed,
            State::Aborting => BranchState::RolledBack,
            s => panic!("phase-2 ack in state {s:?}"),
        };
        self.finish_if_acked(now_ms)
    }

    /// Whether a rollback that keeps failing to reach its participant may be given up now:
    /// only an abort's, and only once `retry_for` has passed since the decision. A commit is
    /// re-sent until it is acknowledged, for a committed branch has no other way to learn
    /// that it must commit than being told (the participant's resolver asks, but a coordinator
    /// that had forgotten the commit would answer ABORTED).
    pub fn may_abandon(&self, now_ms: i64, retry_for: std::time::Duration) -> bool {
        let retry_for_ms = i64::try_from(retry_for.as_millis()).unwrap_or(i64::MAX);
        self.state == State::Aborting && now_ms >= self.decided_ms.saturating_add(retry_for_ms)
    }

    /// Stops sending a rollback to a branch whose participant cannot be reached (see
    /// `may_abandon` and [`BranchState::Abandoned`]). Returns true when that finished the
    /// transaction, which then retires and is pruned like any other.
    pub fn abandon(&mut self, branch: usize, now_ms: i64) -> bool {
        assert_eq!(
            self.state,
            State::Aborting,
            "only an abort's rollback is ever abandoned"
        );
        self.branches[branch].state = BranchState::Abandoned;
        self.finish_if_acked(now_ms)
    }

    /// The xid a participant's branch voted with, if the record knows it (0 otherwise).
    pub fn xid_of(&self, participant_id: &str) -> u64 {
        self.branches
            .iter()
            .find(|b| b.participant_id == participant_id)
            .map_or(0, |b| b.xid)
    }

    /// The state clients are shown. Until a commit decision is durable (`announced`), it is
    /// shown as still preparing: nobody may read "committing" into a decision that a crash
    /// could still undo.
    pub fn shown_state(&self, announced: Outcome) -> State {
        match self.state {
            State::OnePhase => State::Preparing,
            s if s.is_commit() && announced == Outcome::Pending => State::Preparing,
            s => s,
        }
    }

    fn finish_if_acked(&mut self, now_ms: i64) -> bool {
        if !self.branches_to_finish().is_empty() {
            return false;
        }
        self.state = match self.state {
            State::Committing => State::Committed,
            State::Aborting => State::Aborted,
            s => return s.is_final(),
        };
        self.finished_ms = now_ms;
        true
    }

    fn not_active(&self, action: &'static str) -> TxnError {
        TxnError::NotActive {
            id: self.id,
            state: self.state,
            action,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_naming_the_branches_by_id_or_url_goes_ahead() {
        let mut txn = txn_with(&["p1", "p2"]);
        let names = ["p1".to_string(), "http://p2/".to_string()];
        assert!(txn.abort_unnamed(&names, 5).is_none());
        assert_eq!(txn.state, State::Active);
    }

    #[test]
    fn commit_naming_a_participant_that_never_enlisted_aborts_and_says_which() {
        // The half-commit of issue 22: p2's Execute failed before p2 could enlist.
        let mut txn = txn_with(&["p1"]);
        let step = txn.abort_unnamed(&["p1".into(), "p2".into()], 5);
        assert!(matches!(step, Some(OnAbort::RollBack(_))));
        assert_eq!(txn.state, State::Aborting);
        assert!(
            txn.reason
                .contains("sent statements to p2, which never enlisted"),
            "{}",
            txn.reason
        );
    }

    #[test]
    fn commit_leaving_out_an_enlisted_branch_aborts_and_says_which() {
        let mut txn = txn_with(&["p1", "p3"]);
        assert!(txn.abort_unnamed(&["p1".into()], 5).is_some());
        assert!(
            txn.reason
                .contains("p3 enlisted, but the client did not name it"),
            "{}",
            txn.reason
        );
    }

    #[test]
    fn naming_is_checked_only_while_active() {
        let mut txn = txn_with(&["p1"]);
        let _ = txn.commit(false);
        assert!(
            txn.abort_unnamed(&[], 5).is_none(),
            "a repeated Commit joins the run"
        );
        assert_eq!(txn.state, State::Preparing);
    }

    fn txn_with(branches: &[&str]) -> Txn {
        let mut txn = Txn::begin(TxnId::generate(), "t".into(), 0, 1000);
        for p in branches {
            assert!(
                txn.register(p, &format!("http://{p}"), "i1", false)
                    .unwrap()
            );
        }
        txn
    }

    #[test]
    fn all_yes_commits_and_finishes_when_every_branch_acks() {
        let mut txn = txn_with(&["p1", "p2"]);
        assert_eq!(txn.commit(true), OnCommit::Prepare(vec![0, 1]));
        txn.record_vote(0, Vote::Yes { xid: 7 });
        txn.record_vote(1, Vote::Yes { xid: 9 });
        assert_eq!(txn.decide(5), Decision::Commit { flush: true });
        assert_eq!(txn.state, State::Committing);
        assert_eq!(txn.branches_to_finish(), vec![0, 1]);
        assert!(!txn.acked(0, 6));
        assert!(txn.acked(1, 7));
        assert_eq!(txn.state, State::Committed);
        assert_eq!(txn.finished_ms, 7);
    }

    #[test]
    fn one_no_aborts_and_rolls_back_every_branch_that_may_be_prepared() {
        let mut txn = txn_with(&["p1", "p2", "p3"]);
        txn.commit(true);
        txn.record_vote(0, Vote::Yes { xid: 7 });
        txn.record_vote(
            1,
            Vote::No {
                reason: "timeout".into(),
            },
        );
        txn.record_vote(2, Vote::ReadOnly);
        assert!(
            matches!(txn.decide(5), Decision::Abort { reason } if reason.contains("p2") && reason.contains("timeout"))
        );
        // p2's no may hide a prepared branch whose yes was lost; p3 finished at its vote.
        assert_eq!(txn.branches_to_finish(), vec![0, 1]);
        txn.acked(0, 6);
        assert!(txn.acked(1, 6));
        assert_eq!(txn.state, State::Aborted);
    }

    #[test]
    fn read_only_branches_need_no_phase_two() {
        let mut txn = txn_with(&["p1", "p2"]);
        txn.commit(true);
        txn.record_vote(0, Vote::ReadOnly);
        txn.record_vote(1, Vote::ReadOnly);
        assert_eq!(
            txn.decide(5),
            Decision::Commit { flush: false },
            "no prepared branch can lose this commit"
        );
        assert_eq!(txn.state, State::Committed);
    }

    #[test]
    fn zero_branches_commit_trivially() {
        let mut txn = txn_with(&[]);
        assert_eq!(txn.commit(true), OnCommit::Prepare(vec![]));
        assert_eq!(txn.decide(1), Decision::Commit { flush: false });
        assert_eq!(txn.state, State::Committed);
    }

    #[test]
    fn commit_and_abort_repeat_the_recorded_outcome() {
        let mut txn = txn_with(&["p1"]);
        txn.commit(true);
        assert_eq!(txn.commit(true), OnCommit::Wait);
        txn.record_vote(0, Vote::Yes { xid: 1 });
        txn.decide(2);
        assert_eq!(txn.commit(true), OnCommit::Decided(Outcome::Committed));
        assert_eq!(txn.abort("late", 3), OnAbort::Decided(Outcome::Committed));

        let mut txn = txn_with(&["p1"]);
        assert_eq!(txn.abort("user", 1), OnAbort::RollBack(vec![0]));
        assert_eq!(txn.commit(true), OnCommit::Decided(Outcome::Aborted));
        assert_eq!(txn.abort("again", 2), OnAbort::Decided(Outcome::Aborted));
        assert_eq!(txn.reason, "user");
    }

    #[test]
    fn abort_during_phase_one_wins_over_yes_votes() {
        let mut txn = txn_with(&["p1"]);
        txn.commit(true);
        assert_eq!(txn.abort("client gave up", 1), OnAbort::Wait);
        txn.record_vote(0, Vote::Yes { xid: 1 });
        assert_eq!(
            txn.decide(2),
            Decision::Abort {
                reason: "client gave up".into()
            }
        );
        assert_eq!(txn.branches_to_finish(), vec![0]);
    }

    #[test]
    fn after_a_crash_a_durable_commit_stands_and_everything_else_aborts() {
        let mut committing = txn_with(&["p1", "p2"]);
        committing.commit(true);
        committing.record_vote(0, Vote::Yes { xid: 1 });
        committing.record_vote(1, Vote::Yes { xid: 2 });
        committing.decide(1);
        committing.acked(0, 2);
        // What the log held when the process died: the decision, one branch acked in memory only.
        let mut logged = committing.clone();
        logged.branches[0].state = BranchState::Prepared;
        assert_eq!(
            logged.recover(3),
            Decision::Commit { flush: false },
            "read back from disk: durable already"
        );
        assert_eq!(
            logged.branches_to_finish(),
            vec![0, 1],
            "COMMIT PREPARED is re-driven to both"
        );

        let mut active = txn_with(&["p1"]);
        assert!(matches!(active.recover(3), Decision::Abort { .. }));
        assert_eq!(active.state, State::Aborting);
        assert_eq!(
            active.branches_to_finish(),
            vec![0],
            "its branch may be prepared: roll it back"
        );
    }

    #[test]
    fn an_operator_can_finish_a_decision_but_never_reverse_it() {
        let mut txn = txn_with(&["p1", "p2"]);
        txn.commit(true);
        txn.record_vote(0, Vote::Yes { xid: 1 });
        txn.record_vote(1, Vote::Yes { xid: 2 });
        txn.decide(1);
        txn.acked(0, 2);
        assert!(matches!(
            txn.force(false, 3),
            Err(TxnError::CannotForce { .. })
        ));
        assert_eq!(txn.force(true, 3), Ok(vec!["p2".to_string()]));
        assert_eq!(txn.state, State::Committed);
        assert_eq!(txn.branches[1].state, BranchState::Committed);

        let mut active = txn_with(&["p1"]);
        assert!(
            matches!(active.force(true, 1), Err(TxnError::CannotForce { .. })),
            "undecided: use Commit"
        );
    }

    #[test]
    fn only_an_aborts_rollback_is_abandoned_and_only_after_its_retry_window() {
        let window = std::time::Duration::from_secs(60);
        let mut aborting = txn_with(&["p1", "p2"]);
        aborting.abort("client gave up", 1_000);
        assert!(!aborting.may_abandon(60_999, window), "inside the window");
        assert!(aborting.may_abandon(61_000, window));

        assert!(
            !aborting.abandon(0, 61_000),
            "p2 is still owed its rollback"
        );
        assert!(aborting.acked(1, 61_001));
        assert_eq!(aborting.state, State::Aborted);
        assert_eq!(aborting.branches[0].state, BranchState::Abandoned);
        assert_eq!(aborting.state.settled().outcome(), Outcome::Aborted);

        let mut committing = txn_with(&["p1"]);
        committing.commit(false);
        committing.record_vote(0, Vote::Yes { xid: 7 });
        committing.decide(1_000);
        assert!(
            !committing.may_abandon(i64::MAX, window),
            "a commit is re-sent until acknowledged"
        );
    }

    #[test]
    fn branches_register_only_while_active_and_idempotently() {
        let mut txn = txn_with(&["p1"]);
        assert!(!txn.register("p1", "http://p1", "i1", false).unwrap());
        assert!(matches!(
            txn.register("p1", "http://elsewhere", "i1", false),
            Err(TxnError::EndpointMismatch { .. })
        ));
        assert!(
            matches!(
                txn.register("p1", "http://p1", "i2", false),
                Err(TxnError::BranchLost { .. })
            ),
            "a restarted participant lost the branch's statements"
        );
        txn.commit(true);
        assert!(matches!(
            txn.register("p2", "http://p2", "i1", false),
            Err(TxnError::NotActive { .. })
        ));
    }

    #[test]
    fn the_deadline_aborts_only_what_nobody_is_committing() {
        let mut active = txn_with(&["p1"]);
        assert_eq!(active.expire(9), Some(OnAbort::RollBack(vec![0])));
        assert_eq!(active.reason, "deadline exceeded while active");

        let mut preparing = txn_with(&["p1"]);
        preparing.commit(true);
        assert_eq!(
            preparing.expire(9),
            None,
            "the prepare timeout bounds phase 1"
        );
        assert_eq!(preparing.state, State::Preparing);
    }

    #[test]
    fn a_record_that_is_no_longer_live_stands_for_its_settled_outcome() {
        for (logged, settled) in [
            (State::Active, State::Aborted),
            (State::Preparing, State::Aborted),
            (State::Committing, State::Committing),
            (State::Aborting, State::Aborting),
        ] {
            assert_eq!(logged.settled(), settled);
        }
        assert_eq!(State::Committing.settled().outcome(), Outcome::Committed);
        assert_eq!(State::Preparing.settled().outcome(), Outcome::Aborted);
    }

    #[test]
    fn a_commit_is_shown_as_preparing_until_it_is_announced() {
        let mut txn = txn_with(&["p1"]);
        txn.commit(true);
        txn.record_vote(0, Vote::Yes { xid: 1 });
        txn.decide(1);
        assert_eq!(txn.shown_state(Outcome::Pending), State::Preparing);
        assert_eq!(txn.shown_state(Outcome::Committed), State::Committing);
    }

    #[test]
    fn an_operator_aborts_the_undecided_and_forces_only_the_decided_way() {
        let active = txn_with(&["p1"]);
        assert_eq!(active.resolve(false), Ok(OnResolve::Abort));
        assert!(matches!(
            active.resolve(true),
            Err(TxnError::CannotForce { .. })
        ));

        let mut committing = txn_with(&["p1"]);
        committing.commit(true);
        committing.record_vote(0, Vote::Yes { xid: 1 });
        committing.decide(1);
        assert_eq!(committing.resolve(true), Ok(OnResolve::WaitThenForce));
        assert!(matches!(
            committing.resolve(false),
            Err(TxnError::CannotForce { .. })
        ));

        let settled = txn_with(&["p1"]).settle();
        assert_eq!(settled.state, State::Aborted);
        assert_eq!(
            settled.resolve(false),
            Ok(OnResolve::Force),
            "a repeat is fine"
        );
        assert!(matches!(
            settled.resolve(true),
            Err(TxnError::CannotForce { .. })
        ));
    }

    fn one_phase_txn() -> Txn {
        let mut txn = Txn::begin(TxnId::generate(), "t".into(), 0, 1000);
        txn.register("p1", "http://p1", "i1", true).unwrap();
        txn
    }

    #[test]
    fn only_a_lone_branch_whose_participant_can_commits_in_one_phase() {
        let mut lone = one_phase_txn();
        assert_eq!(lone.commit(true), OnCommit::OnePhase(0));
        assert_eq!(lone.state, State::OnePhase);
        assert_eq!(
            lone.commit(true),
            OnCommit::Wait,
            "a repeated Commit joins it"
        );

        let mut turned_off = one_phase_txn();
        assert_eq!(turned_off.commit(false), OnCommit::Prepare(vec![0]));

        let mut not_capable = txn_with(&["p1"]);
        assert_eq!(not_capable.commit(true), OnCommit::Prepare(vec![0]));

        let mut two = one_phase_txn();
        two.register("p2", "http://p2", "i1", true).unwrap();
        assert_eq!(two.commit(true), OnCommit::Prepare(vec![0, 1]));
    }

    #[test]
    fn the_participants_answer_is_the_outcome_and_an_abort_cannot_overrule_it() {
        let mut txn = one_phase_txn();
        txn.commit(true);
        assert_eq!(txn.abort("client gave up", 1), OnAbort::Wait);
        assert_eq!(txn.expire(2), None, "the deadline no longer applies");
        txn.one_phase_answered(&OnePhaseOutcome::Committed { read_only: false }, 3);
        assert_eq!(txn.state, State::Committed);
        assert_eq!(txn.branches[0].state, BranchState::Committed);
        assert!(txn.branches_to_finish().is_empty());
        assert_eq!(txn.abort("late", 4), OnAbort::Decided(Outcome::Committed));

        let mut refused = one_phase_txn();
        refused.commit(true);
        refused.one_phase_answered(
            &OnePhaseOutcome::Aborted {
                reason: "deferred constraint".into(),
            },
            3,
        );
        assert_eq!(refused.state, State::Aborted);
        assert!(refused.reason.contains("p1") && refused.reason.contains("deferred constraint"));
    }

    #[test]
    fn a_one_phase_record_is_never_presumed_aborted() {
        let mut txn = one_phase_txn();
        txn.commit(true);
        let logged = txn.clone();
        assert_eq!(logged.clone().settle().state, State::OnePhase);
        assert_eq!(logged.state.settled().outcome(), Outcome::Pending);
        let mut recovered = logged.clone();
        assert_eq!(
            recovered.recover(5),
            Decision::OnePhase,
            "asked again, not aborted"
        );
        assert_eq!(recovered.state, State::OnePhase);
        assert_eq!(txn.shown_state(Outcome::Pending), State::Preparing);
        assert!(matches!(
            txn.resolve(false),
            Err(TxnError::DelegatedToParticipant { .. })
        ));
        assert!(matches!(
            txn.resolve(true),
            Err(TxnError::DelegatedToParticipant { .. })
        ));
    }
}
