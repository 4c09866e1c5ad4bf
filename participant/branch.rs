//! One transaction branch on this participant: a state machine that does no I/O.
//!
//! ```text
//!          statement fails                 prepare: ROLLBACK, vote no
//!  Active ─────────────────▶ Doomed ─────────────────────────────────▶ RolledBack
//!    │  prepare: PREPARE TRANSACTION ok            commit
//!    ├──────────────────────────────────▶ Prepared ───────▶ Committed
//!    │  prepare: nothing written (no xid)    │ rollback
//!    ├──────────────────────────────────▶ ReadOnly       └────────▶ RolledBack
//!    │  rollback / deadline
//!    ├──────────────────────────────────────────────────────────▶ RolledBack
//!    │  commit in one phase (the lone branch): COMMIT ok / failed
//!    ├──────────────────────────────────────────▶ Committed / ReadOnly / RolledBack
//!    │  … the connection broke: only the database can tell
//!    └──────────────────────────────────────────▶ OnePhaseInDoubt
//! ```
//!
//! A statement for a prepared branch is refused and leaves it `refused`: it votes no from then
//! on, because its transaction must not commit without that statement.
//!
//! Every request the coordinator may repeat (after a lost reply) lands on a step that answers
//! the same way again, and a request that contradicts how the branch really ended is refused.
//!
//! The driver (`branches.rs`) asks a `*_step` what to do, does the PostgreSQL work, and reports what
//! happened through a transition (`prepared`, `prepare_failed`, `committed`, …), which also says
//! how to answer. It never assigns a state itself.

use super::gid::Gid;
pub use crate::proto::vote::{OnePhaseOutcome, Vote};

/// Where a branch is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// A PostgreSQL transaction is open on the branch's connection.
    Active,
    /// A statement failed: the branch can only roll back.
    Doomed {
        reason: String,
    },
    /// PREPARE TRANSACTION succeeded; `xid` is the branch's xid8.
    Prepared {
        xid: u64,
        /// Why the branch must vote no from now on: its PREPARE did not complete, or a
        /// statement came for it after it was prepared (out of turn), which its transaction
        /// cannot have without aborting. A Commit the coordinator decided still commits it.
        refused: Option<String>,
    },
    /// It wrote nothing, so it finished at once and voted read-only.
    ReadOnly,
    Committed,
    RolledBack,
    /// Its one-phase COMMIT went out and the connection broke before the answer: its marker
    /// (or a fence) in the database tells how it ended, nothing here does.
    OnePhaseInDoubt,
}

/// What Prepare must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnPrepare {
    /// Read the xid and PREPARE TRANSACTION.
    Prepare,
    /// Roll the open transaction back and vote no.
    RollBackAndRefuse { reason: String },
    /// Answer again as before.
    Answer(Vote),
}

/// What Commit must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnCommit {
    CommitPrepared { xid: u64 },
    AlreadyDone,
}

/// What CommitOnePhase must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnOnePhase {
    /// COMMIT the open transaction, with its marker.
    Commit,
    /// Roll the open transaction back and answer ABORTED.
    RollBackAndRefuse { reason: String },
    /// Look it up in the database (its marker, or a fence).
    AskDatabase,
    /// Answer again as before.
    Answer(OnePhaseOutcome),
}

/// What Rollback must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnRollback {
    /// ROLLBACK on the branch's open connection.
    RollBackOpen,
    RollBackPrepared {
        xid: u64,
    },
    AlreadyDone,
}

/// A request that the branch's state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BranchError {
    #[error(
        "branch {gid} is {state}: statements run only while it is active, and a transaction has one branch per participant (a second would lose the statements of the first), so none of its statements can run here any more"
    )]
    NotActive { gid: String, state: String },
    #[error("branch {gid} failed earlier ({reason}): its transaction can only abort")]
    Doomed { gid: String, reason: String },
    #[error("branch {gid} is {state}, not prepared: it cannot be committed")]
    NotPrepared { gid: String, state: String },
    #[error("branch {gid} already committed: it cannot be rolled back")]
    AlreadyCommitted { gid: String },
    #[error(
        "branch {gid} is prepared: it is being committed in two phases, so CommitOnePhase does not apply"
    )]
    Prepared { gid: String },
    #[error(
        "branch {gid} was being committed in one phase when its connection broke: only CommitOnePhase can tell how it ended"
    )]
    OnePhaseInDoubt { gid: String },
}

/// One branch of a global transaction on this participant.
#[derive(Clone, Debug)]
pub struct Branch {
    /// Its PostgreSQL gid, naming its coordinator and transaction.
    pub gid: Gid,
    pub state: State,
    /// When the coordinator aborts the transaction if it is still active (Unix ms).
    pub deadline_ms: i64,
}

impl Branch {
    pub fn new(gid: Gid, deadline_ms: i64) -> Self {
        Branch {
            gid,
            state: State::Active,
            deadline_ms,
        }
    }

    fn describe(&self) -> String {
        match &self.state {
            State::Active => "active".into(),
            State::Doomed { .. } => "failed".into(),
            State::Prepared { .. } => "prepared".into(),
            State::ReadOnly => "finished (read-only)".into(),
            State::Committed => "committed".into(),
            State::RolledBack => "rolled back".into(),
            State::OnePhaseInDoubt => "in doubt (one-phase commit)".into(),
        }
    }

    /// May a statement run? A statement for a prepared branch (prepared out of turn, or a
    /// client racing its own Commit) is refused, and the branch votes no from then on: the
    /// transaction must not commit without that statement.
    pub fn check_execute(&mut self) -> Result<(), BranchError> {
        match &mut self.state {
            State::Active => Ok(()),
            State::Doomed { reason } => Err(BranchError::Doomed {
                gid: self.gid.to_string(),
                reason: reason.clone(),
            }),
            State::Prepared { refused, .. } => {
                refused.get_or_insert_with(|| {
                    "a statement came for the branch after it was prepared".into()
                });
                Err(self.not_active())
            }
            _ => Err(self.not_active()),
        }
    }

    /// Why a statement cannot run in this branch, which is past `Active`.
    pub fn not_active(&self) -> BranchError {
        BranchError::NotActive {
            gid: self.gid.to_string(),
            state: self.describe(),
        }
    }

    /// A statement failed inside the branch.
    pub fn doom(&mut self, reason: String) {
        if self.state == State::Active {
            self.state = State::Doomed { reason };
        }
    }

    pub fn prepare_step(&self) -> OnPrepare {
        match &self.state {
            State::Active => OnPrepare::Prepare,
            State::Doomed { reason } => OnPrepare::RollBackAndRefuse {
                reason: reason.clone(),
            },
            State::Prepared { xid, refused: None } => OnPrepare::Answer(Vote::Yes { xid: *xid }),
            State::Prepared {
                refused: Some(reason),
                ..
            } => OnPrepare::Answer(Vote::No {
                reason: reason.clone(),
            }),
            State::Committed => OnPrepare::Answer(Vote::Yes { xid: 0 }),
            State::ReadOnly => OnPrepare::Answer(Vote::ReadOnly),
            State::RolledBack => OnPrepare::Answer(Vote::No {
                reason: "the branch was rolled back".into(),
            }),
            State::OnePhaseInDoubt => OnPrepare::Answer(Vote::No {
                reason: "the branch is being committed in one phase".into(),
            }),
        }
    }

    /// The lone branch is to commit in one phase. A repeat (after a lost reply) answers as
    /// before; an open branch commits now, since the first request may never have arrived.
    pub fn one_phase_step(&self) -> Result<OnOnePhase, BranchError> {
        Ok(match &self.state {
            State::Active => OnOnePhase::Commit,
            State::Doomed { reason } => OnOnePhase::RollBackAndRefuse {
                reason: reason.clone(),
            },
            State::Committed => OnOnePhase::Answer(OnePhaseOutcome::Committed { read_only: false }),
            State::ReadOnly => OnOnePhase::Answer(OnePhaseOutcome::Committed { read_only: true }),
            State::RolledBack => OnOnePhase::Answer(OnePhaseOutcome::Aborted {
                reason: "the branch was rolled back".into(),
            }),
            State::OnePhaseInDoubt => OnOnePhase::AskDatabase,
            State::Prepared { .. } => {
                return Err(BranchError::Prepared {
                    gid: self.gid.to_string(),
                });
            }
        })
    }

    pub fn commit_step(&self) -> Result<OnCommit, BranchError> {
        match &self.state {
            State::Prepared { xid, .. } => Ok(OnCommit::CommitPrepared { xid: *xid }),
            State::Committed | State::ReadOnly => Ok(OnCommit::AlreadyDone),
            _ => Err(BranchError::NotPrepared {
                gid: self.gid.to_string(),
                state: self.describe(),
            }),
        }
    }

    pub fn rollback_step(&self) -> Result<OnRollback, BranchError> {
        match &self.state {
            State::Active | State::Doomed { .. } => Ok(OnRollback::RollBackOpen),
            State::Prepared { xid, .. } => Ok(OnRollback::RollBackPrepared { xid: *xid }),
            // A read-only branch wrote nothing: committed and rolled back look the same.
            State::RolledBack | State::ReadOnly => Ok(OnRollback::AlreadyDone),
            State::Committed => Err(BranchError::AlreadyCommitted {
                gid: self.gid.to_string(),
            }),
            State::OnePhaseInDoubt => Err(BranchError::OnePhaseInDoubt {
                gid: self.gid.to_string(),
            }),
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self.state,
            State::ReadOnly | State::Committed | State::RolledBack
        )
    }

    /// Its PostgreSQL transaction is still open (not prepared, not ended): a deadline or a
    /// rollback must end it on its connection.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Active | State::Doomed { .. })
    }

    /// PREPARE TRANSACTION succeeded and was seen in `pg_prepared_xacts`.
    pub fn prepared(&mut self, xid: u64) -> Vote {
        self.state = State::Prepared { xid, refused: None };
        Vote::Yes { xid }
    }

    /// It wrote nothing (or no statement ever ran): finished at once.
    pub fn read_only(&mut self) -> Vote {
        self.state = State::ReadOnly;
        Vote::ReadOnly
    }

    /// PostgreSQL rolled the transaction back instead of preparing it, or a doomed branch was
    /// rolled back at Prepare: either way it is gone, and the vote is no.
    pub fn refused(&mut self, reason: String) -> Vote {
        self.state = State::RolledBack;
        Vote::No { reason }
    }

    /// The connection broke mid-PREPARE: the branch may or may not be prepared. It is taken
    /// as prepared (with the xid, if `pg_prepared_xacts` shows it, else 0) and votes no: the
    /// rollback that must follow settles it either way, and a Commit can never reach it.
    pub fn prepare_failed(&mut self, xid: Option<u64>, error: String) -> Vote {
        let reason = format!("PREPARE TRANSACTION did not complete: {error}");
        self.state = State::Prepared {
            xid: xid.unwrap_or(0),
            refused: Some(reason.clone()),
        };
        Vote::No { reason }
    }

    /// COMMIT PREPARED succeeded (or was found done).
    pub fn committed(&mut self) {
        self.state = State::Committed;
    }

    /// The open transaction or the prepared one was rolled back.
    pub fn rolled_back(&mut self) {
        self.state = State::RolledBack;
    }

    /// How its one-phase commit ended, from PostgreSQL's answer or from the database's
    /// marker: the answer for the coordinator.
    pub fn one_phase_ended(&mut self, outcome: OnePhaseOutcome) -> OnePhaseOutcome {
        self.state = match &outcome {
            OnePhaseOutcome::Committed { read_only: true } => State::ReadOnly,
            OnePhaseOutcome::Committed { read_only: false } => State::Committed,
            OnePhaseOutcome::Aborted { .. } => State::RolledBack,
        };
        outcome
    }

    /// Its one-phase COMMIT went out and no answer came back.
    pub fn one_phase_in_doubt(&mut self) {
        self.state = State::OnePhaseInDoubt;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TxnId;

    fn branch() -> Branch {
        Branch::new(Gid::new("c1", TxnId::generate()).unwrap(), 0)
    }

    #[test]
    fn a_failed_statement_dooms_the_branch_to_vote_no() {
        let mut b = branch();
        b.doom("ERROR 23505".into());
        assert!(matches!(b.check_execute(), Err(BranchError::Doomed { .. })));
        assert_eq!(
            b.prepare_step(),
            OnPrepare::RollBackAndRefuse {
                reason: "ERROR 23505".into()
            }
        );
        assert_eq!(b.rollback_step(), Ok(OnRollback::RollBackOpen));
    }

    #[test]
    fn prepared_branch_answers_repeats_the_same_way() {
        let mut b = branch();
        assert_eq!(b.prepared(42), Vote::Yes { xid: 42 });
        assert_eq!(b.prepare_step(), OnPrepare::Answer(Vote::Yes { xid: 42 }));
        assert!(matches!(
            b.check_execute(),
            Err(BranchError::NotActive { .. })
        ));
        assert_eq!(b.commit_step(), Ok(OnCommit::CommitPrepared { xid: 42 }));
        b.committed();
        assert_eq!(b.commit_step(), Ok(OnCommit::AlreadyDone));
        assert!(matches!(
            b.rollback_step(),
            Err(BranchError::AlreadyCommitted { .. })
        ));
    }

    #[test]
    fn a_statement_for_a_prepared_branch_is_refused_and_turns_its_vote_to_no() {
        let mut b = branch();
        b.prepared(42);

        let refused = b.check_execute();

        assert!(matches!(refused, Err(BranchError::NotActive { .. })));
        assert!(matches!(
            b.prepare_step(),
            OnPrepare::Answer(Vote::No { reason }) if reason.contains("after it was prepared")
        ));
        assert_eq!(
            b.rollback_step(),
            Ok(OnRollback::RollBackPrepared { xid: 42 })
        );
        assert_eq!(
            b.commit_step(),
            Ok(OnCommit::CommitPrepared { xid: 42 }),
            "a commit already decided on the earlier yes still goes through"
        );
    }

    #[test]
    fn a_rolled_back_branch_cannot_be_committed() {
        let mut b = branch();
        b.rolled_back();
        assert!(matches!(
            b.commit_step(),
            Err(BranchError::NotPrepared { .. })
        ));
        assert_eq!(b.rollback_step(), Ok(OnRollback::AlreadyDone));
        assert!(matches!(
            b.prepare_step(),
            OnPrepare::Answer(Vote::No { .. })
        ));
    }

    #[test]
    fn an_active_branch_cannot_be_committed_without_prepare() {
        assert!(matches!(
            branch().commit_step(),
            Err(BranchError::NotPrepared { .. })
        ));
    }

    #[test]
    fn a_prepare_that_broke_midway_votes_no_and_can_only_be_rolled_back() {
        let mut b = branch();
        let vote = b.prepare_failed(Some(7), "connection reset".into());
        assert!(matches!(vote, Vote::No { reason } if reason.contains("connection reset")));
        assert_eq!(
            b.rollback_step(),
            Ok(OnRollback::RollBackPrepared { xid: 7 })
        );
        assert_eq!(
            b.commit_step(),
            Ok(OnCommit::CommitPrepared { xid: 7 }),
            "the coordinator never sends it (the vote was no), but a commit by gid stays checkable"
        );
        assert!(
            matches!(b.prepare_step(), OnPrepare::Answer(Vote::No { .. })),
            "a repeated Prepare votes no again"
        );
        let mut unknown = branch();
        unknown.prepare_failed(None, "timeout".into());
        assert_eq!(
            unknown.rollback_step(),
            Ok(OnRollback::RollBackPrepared { xid: 0 })
        );
    }

    #[test]
    fn a_one_phase_commit_answers_repeats_as_it_ended() {
        let mut b = branch();
        assert_eq!(b.one_phase_step(), Ok(OnOnePhase::Commit));
        b.one_phase_ended(OnePhaseOutcome::Committed { read_only: false });
        assert_eq!(
            b.one_phase_step(),
            Ok(OnOnePhase::Answer(OnePhaseOutcome::Committed {
                read_only: false
            }))
        );
        assert!(b.is_finished());
        assert!(matches!(
            b.rollback_step(),
            Err(BranchError::AlreadyCommitted { .. })
        ));

        let mut doomed = branch();
        doomed.doom("ERROR 23505".into());
        assert_eq!(
            doomed.one_phase_step(),
            Ok(OnOnePhase::RollBackAndRefuse {
                reason: "ERROR 23505".into()
            })
        );

        let mut prepared = branch();
        prepared.prepared(7);
        assert!(matches!(
            prepared.one_phase_step(),
            Err(BranchError::Prepared { .. })
        ));
    }

    #[test]
    fn a_one_phase_commit_whose_connection_broke_is_for_the_database_to_tell() {
        let mut b = branch();
        b.one_phase_in_doubt();
        assert_eq!(b.one_phase_step(), Ok(OnOnePhase::AskDatabase));
        assert!(
            !b.is_open() && !b.is_finished(),
            "no deadline rollback, not forgotten"
        );
        assert!(matches!(
            b.rollback_step(),
            Err(BranchError::OnePhaseInDoubt { .. })
        ));
        assert!(matches!(
            b.commit_step(),
            Err(BranchError::NotPrepared { .. })
        ));
    }

    #[test]
    fn a_branch_that_wrote_nothing_finishes_at_its_vote() {
        let mut b = branch();
        assert_eq!(b.read_only(), Vote::ReadOnly);
        assert!(b.is_finished() && !b.is_open());
        assert_eq!(b.prepare_step(), OnPrepare::Answer(Vote::ReadOnly));
        assert_eq!(b.rollback_step(), Ok(OnRollback::AlreadyDone));
    }
}
