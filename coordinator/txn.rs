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
//! ```
//!
//! The driver (`commit.rs`) asks this machine what to do next, performs the I/O, and feeds the
//! results back. Keeping the rules here means a crash-by-crash test needs no network, no sled and
//! no PostgreSQL: see the tests at the bottom.

use crate::proto::{self, TxnId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Active,
    Preparing,
    Committing,
    Committed,
    Aborting,
    Aborted,
}

impl State {
    /// Nothing more will happen to a transaction in a final state.
    pub fn is_final(self) -> bool {
        matches!(self, State::Committed | State::Aborted)
    }

    /// The outcome this state implies.
    pub fn outcome(self) -> proto::Outcome {
        match self {
            State::Active | State::Preparing => proto::Outcome::Pending,
            State::Committing | State::Committed => proto::Outcome::Committed,
            State::Aborting | State::Aborted => proto::Outcome::Aborted,
        }
    }

    pub fn from_proto(s: proto::TxnState) -> State {
        match s {
            proto::TxnState::Active | proto::TxnState::Unspecified => State::Active,
            proto::TxnState::Preparing => State::Preparing,
            proto::TxnState::Committing => State::Committing,
            proto::TxnState::Committed => State::Committed,
            proto::TxnState::Aborting => State::Aborting,
            proto::TxnState::Aborted => State::Aborted,
        }
    }

    pub fn to_proto(self) -> proto::TxnState {
        match self {
            State::Active => proto::TxnState::Active,
            State::Preparing => proto::TxnState::Preparing,
            State::Committing => proto::TxnState::Committing,
            State::Committed => proto::TxnState::Committed,
            State::Aborting => proto::TxnState::Aborting,
            State::Aborted => proto::TxnState::Aborted,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BranchState {
    Active,
    Preparing,
    Prepared,
    ReadOnly,
    Failed,
    Committed,
    RolledBack,
}

impl BranchState {
    fn to_proto(self) -> proto::BranchState {
        match self {
            BranchState::Active => proto::BranchState::Active,
            BranchState::Preparing => proto::BranchState::Preparing,
            BranchState::Prepared => proto::BranchState::Prepared,
            BranchState::ReadOnly => proto::BranchState::ReadOnly,
            BranchState::Failed => proto::BranchState::Failed,
            BranchState::Committed => proto::BranchState::Committed,
            BranchState::RolledBack => proto::BranchState::RolledBack,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    pub participant_id: String,
    pub endpoint: String,
    /// The participant process that registered it.
    #[serde(default)]
    pub instance: String,
    pub state: BranchState,
    /// The branch's PostgreSQL xid8, carried with its yes vote; 0 until then.
    pub xid: u64,
}

/// A participant's answer to Prepare, with transport failures folded into `No`: whatever the
/// reason, a branch that did not say yes cannot commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vote {
    Yes { xid: u64 },
    ReadOnly,
    No { reason: String },
}

/// What the coordinator decided once every vote was in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Abort { reason: String },
}

/// What `commit()` asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitStep {
    /// Send Prepare to these branches (by index) concurrently, then call `decide`.
    Prepare(Vec<usize>),
    /// Someone else's Commit is already running it: wait for the outcome.
    Wait,
    /// Already decided.
    Decided(proto::Outcome),
}

/// What `abort()` asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AbortStep {
    /// Aborted now: roll back these branches (by index).
    RollBack(Vec<usize>),
    /// Votes are coming in: the decision will be abort; wait for it.
    Wait,
    /// Already decided.
    Decided(proto::Outcome),
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub id: TxnId,
    pub label: String,
    pub state: State,
    pub branches: Vec<Branch>,
    pub created_ms: i64,
    pub deadline_ms: i64,
    pub decided_ms: i64,
    pub finished_ms: i64,
    /// Why it aborted.
    pub reason: String,
    /// An operator declared some branch finished without its acknowledgement: that branch may
    /// still be prepared somewhere, so this record must outlive any retention period.
    #[serde(default)]
    pub forced: bool,
    /// Abort was asked for while votes were coming in; `decide` honours it.
    #[serde(skip)]
    abort_requested: Option<String>,
}

impl Txn {
    pub fn begin(id: TxnId, label: String, created_ms: i64, deadline_ms: i64) -> Self {
        Txn {
            id,
            label,
            state: State::Active,
            branches: Vec::new(),
            created_ms,
            deadline_ms,
            decided_ms: 0,
            finished_ms: 0,
            reason: String::new(),
            forced: false,
            abort_requested: None,
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
        self.branches.push(Branch {
            participant_id: participant_id.to_string(),
            endpoint: endpoint.to_string(),
            instance: instance.to_string(),
            state: BranchState::Active,
            xid: 0,
        });
        Ok(true)
    }

    /// Commit was called: start phase 1, or report why not.
    pub fn commit(&mut self) -> CommitStep {
        match self.state {
            State::Active => {
                self.state = State::Preparing;
                for b in &mut self.branches {
                    b.state = BranchState::Preparing;
                }
                CommitStep::Prepare((0..self.branches.len()).collect())
            }
            State::Preparing => CommitStep::Wait,
            s => CommitStep::Decided(s.outcome()),
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

    /// Every vote is in: decide. A commit decision must be logged and flushed by the caller
    /// before anyone hears of it.
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
            self.finish_if_acked(now_ms);
            Decision::Commit
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

    /// Abort was asked for (by a client, or by the deadline).
    pub fn abort(&mut self, reason: &str, now_ms: i64) -> AbortStep {
        match self.state {
            State::Active => {
                self.state = State::Aborting;
                self.reason = reason.to_string();
                self.decided_ms = now_ms;
                let branches = self.branches_to_finish();
                self.finish_if_acked(now_ms);
                AbortStep::RollBack(branches)
            }
            State::Preparing => {
                self.abort_requested
                    .get_or_insert_with(|| reason.to_string());
                AbortStep::Wait
            }
            s => AbortStep::Decided(s.outcome()),
        }
    }

    /// The coordinator restarted and found this unfinished record. A durable commit decision
    /// stands; anything else never reached one, so it aborts (presumed abort).
    pub fn recover(&mut self, now_ms: i64) -> Decision {
        match self.state {
            State::Committing => Decision::Commit,
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

    /// An operator declares every branch still owed phase 2 finished the way the transaction
    /// was decided (its participant is gone for good), so the transaction can retire. A
    /// decision is never changed: forcing the other way is refused.
    pub fn force(&mut self, commit: bool, now_ms: i64) -> Result<(), TxnError> {
        match (self.state, commit) {
            (State::Committing, true) | (State::Aborting, false) => {
                for i in self.branches_to_finish() {
                    self.forced = true;
                    self.branches[i].state = if commit {
                        BranchState::Committed
                    } else {
                        BranchState::RolledBack
                    };
                }
                self.finish_if_acked(now_ms);
                Ok(())
            }
            (State::Committed, true) | (State::Aborted, false) => Ok(()),
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
                BranchState::ReadOnly | BranchState::Committed | BranchState::RolledBack => false,
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

    /// The transaction as clients see it. Until a commit decision is durable (`announced`),
    /// it is shown as still preparing: nobody may read "committing" into a decision that a
    /// crash could still undo.
    pub fn to_proto(&self, announced: proto::Outcome) -> proto::Transaction {
        let shown = match self.state {
            State::Committing | State::Committed if announced == proto::Outcome::Pending => {
                State::Preparing
            }
            s => s,
        };
        proto::Transaction {
            txn_id: self.id.to_string(),
            state: shown.to_proto() as i32,
            outcome: announced as i32,
            label: self.label.clone(),
            branches: self
                .branches
                .iter()
                .map(|b| proto::Branch {
                    participant_id: b.participant_id.clone(),
                    endpoint: b.endpoint.clone(),
                    state: b.state.to_proto() as i32,
                    xid: b.xid,
                })
                .collect(),
            created_unix_ms: self.created_ms,
            deadline_unix_ms: self.deadline_ms,
            decided_unix_ms: self.decided_ms,
            finished_unix_ms: self.finished_ms,
            reason: self.reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Outcome;

    fn txn_with(branches: &[&str]) -> Txn {
        let mut txn = Txn::begin(TxnId::generate(), "t".into(), 0, 1000);
        for p in branches {
            assert!(txn.register(p, &format!("http://{p}"), "i1").unwrap());
        }
        txn
    }

    #[test]
    fn all_yes_commits_and_finishes_when_every_branch_acks() {
        let mut txn = txn_with(&["p1", "p2"]);
        assert_eq!(txn.commit(), CommitStep::Prepare(vec![0, 1]));
        txn.record_vote(0, Vote::Yes { xid: 7 });
        txn.record_vote(1, Vote::Yes { xid: 9 });
        assert_eq!(txn.decide(5), Decision::Commit);
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
        txn.commit();
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
        txn.commit();
        txn.record_vote(0, Vote::ReadOnly);
        txn.record_vote(1, Vote::ReadOnly);
        assert_eq!(txn.decide(5), Decision::Commit);
        assert_eq!(txn.state, State::Committed);
    }

    #[test]
    fn zero_branches_commit_trivially() {
        let mut txn = txn_with(&[]);
        assert_eq!(txn.commit(), CommitStep::Prepare(vec![]));
        assert_eq!(txn.decide(1), Decision::Commit);
        assert_eq!(txn.state, State::Committed);
    }

    #[test]
    fn commit_and_abort_repeat_the_recorded_outcome() {
        let mut txn = txn_with(&["p1"]);
        txn.commit();
        assert_eq!(txn.commit(), CommitStep::Wait);
        txn.record_vote(0, Vote::Yes { xid: 1 });
        txn.decide(2);
        assert_eq!(txn.commit(), CommitStep::Decided(Outcome::Committed));
        assert_eq!(txn.abort("late", 3), AbortStep::Decided(Outcome::Committed));

        let mut txn = txn_with(&["p1"]);
        assert_eq!(txn.abort("user", 1), AbortStep::RollBack(vec![0]));
        assert_eq!(txn.commit(), CommitStep::Decided(Outcome::Aborted));
        assert_eq!(txn.abort("again", 2), AbortStep::Decided(Outcome::Aborted));
        assert_eq!(txn.reason, "user");
    }

    #[test]
    fn abort_during_phase_one_wins_over_yes_votes() {
        let mut txn = txn_with(&["p1"]);
        txn.commit();
        assert_eq!(txn.abort("client gave up", 1), AbortStep::Wait);
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
        committing.commit();
        committing.record_vote(0, Vote::Yes { xid: 1 });
        committing.record_vote(1, Vote::Yes { xid: 2 });
        committing.decide(1);
        committing.acked(0, 2);
        // What the log held when the process died: the decision, one branch acked in memory only.
        let mut logged = committing.clone();
        logged.branches[0].state = BranchState::Prepared;
        assert_eq!(logged.recover(3), Decision::Commit);
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
        txn.commit();
        txn.record_vote(0, Vote::Yes { xid: 1 });
        txn.record_vote(1, Vote::Yes { xid: 2 });
        txn.decide(1);
        txn.acked(0, 2);
        assert!(matches!(
            txn.force(false, 3),
            Err(TxnError::CannotForce { .. })
        ));
        assert_eq!(txn.force(true, 3), Ok(()));
        assert_eq!(txn.state, State::Committed);
        assert_eq!(txn.branches[1].state, BranchState::Committed);

        let mut active = txn_with(&["p1"]);
        assert!(
            matches!(active.force(true, 1), Err(TxnError::CannotForce { .. })),
            "undecided: use Commit"
        );
    }

    #[test]
    fn branches_register_only_while_active_and_idempotently() {
        let mut txn = txn_with(&["p1"]);
        assert!(!txn.register("p1", "http://p1", "i1").unwrap());
        assert!(matches!(
            txn.register("p1", "http://elsewhere", "i1"),
            Err(TxnError::EndpointMismatch { .. })
        ));
        assert!(
            matches!(
                txn.register("p1", "http://p1", "i2"),
                Err(TxnError::BranchLost { .. })
            ),
            "a restarted participant lost the branch's statements"
        );
        txn.commit();
        assert!(matches!(
            txn.register("p2", "http://p2", "i1"),
            Err(TxnError::NotActive { .. })
        ));
    }
}
