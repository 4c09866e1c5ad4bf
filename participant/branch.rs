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
//!    └──────────────────────────────────────────────────────────▶ RolledBack
//! ```
//!
//! Every request the coordinator may repeat (after a lost reply) lands on a step that answers
//! the same way again, and a request that contradicts how the branch really ended is refused.

use super::gid::Gid;

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
    },
    /// It wrote nothing, so it finished at once and voted read-only.
    ReadOnly,
    Committed,
    RolledBack,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vote {
    Yes { xid: u64 },
    ReadOnly,
    No { reason: String },
}

/// What Prepare must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrepareStep {
    /// Read the xid and PREPARE TRANSACTION.
    Prepare,
    /// Roll the open transaction back and vote no.
    RollBackAndRefuse { reason: String },
    /// Answer again as before.
    Answer(Vote),
}

/// What Commit must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitStep {
    CommitPrepared { xid: u64 },
    AlreadyDone,
}

/// What Rollback must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RollbackStep {
    /// ROLLBACK on the branch's open connection.
    RollBackOpen,
    RollBackPrepared {
        xid: u64,
    },
    AlreadyDone,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BranchError {
    #[error("branch {gid} is {state}: statements run only while it is active")]
    NotActive { gid: String, state: String },
    #[error("branch {gid} failed earlier ({reason}): its transaction can only abort")]
    Doomed { gid: String, reason: String },
    #[error("branch {gid} is {state}, not prepared: it cannot be committed")]
    NotPrepared { gid: String, state: String },
    #[error("branch {gid} already committed: it cannot be rolled back")]
    AlreadyCommitted { gid: String },
}

#[derive(Clone, Debug)]
pub struct Branch {
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
        }
    }

    pub fn check_execute(&self) -> Result<(), BranchError> {
        match &self.state {
            State::Active => Ok(()),
            State::Doomed { reason } => Err(BranchError::Doomed {
                gid: self.gid.to_string(),
                reason: reason.clone(),
            }),
            _ => Err(BranchError::NotActive {
                gid: self.gid.to_string(),
                state: self.describe(),
            }),
        }
    }

    /// A statement failed inside the branch.
    pub fn doom(&mut self, reason: String) {
        if self.state == State::Active {
            self.state = State::Doomed { reason };
        }
    }

    pub fn prepare_step(&self) -> PrepareStep {
        match &self.state {
            State::Active => PrepareStep::Prepare,
            State::Doomed { reason } => PrepareStep::RollBackAndRefuse {
                reason: reason.clone(),
            },
            State::Prepared { xid } => PrepareStep::Answer(Vote::Yes { xid: *xid }),
            State::Committed => PrepareStep::Answer(Vote::Yes { xid: 0 }),
            State::ReadOnly => PrepareStep::Answer(Vote::ReadOnly),
            State::RolledBack => PrepareStep::Answer(Vote::No {
                reason: "the branch was rolled back".into(),
            }),
        }
    }

    pub fn commit_step(&self) -> Result<CommitStep, BranchError> {
        match &self.state {
            State::Prepared { xid } => Ok(CommitStep::CommitPrepared { xid: *xid }),
            State::Committed | State::ReadOnly => Ok(CommitStep::AlreadyDone),
            _ => Err(BranchError::NotPrepared {
                gid: self.gid.to_string(),
                state: self.describe(),
            }),
        }
    }

    pub fn rollback_step(&self) -> Result<RollbackStep, BranchError> {
        match &self.state {
            State::Active | State::Doomed { .. } => Ok(RollbackStep::RollBackOpen),
            State::Prepared { xid } => Ok(RollbackStep::RollBackPrepared { xid: *xid }),
            // A read-only branch wrote nothing: committed and rolled back look the same.
            State::RolledBack | State::ReadOnly => Ok(RollbackStep::AlreadyDone),
            State::Committed => Err(BranchError::AlreadyCommitted {
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
            PrepareStep::RollBackAndRefuse {
                reason: "ERROR 23505".into()
            }
        );
        assert_eq!(b.rollback_step(), Ok(RollbackStep::RollBackOpen));
    }

    #[test]
    fn prepared_branch_answers_repeats_the_same_way() {
        let mut b = branch();
        b.state = State::Prepared { xid: 42 };
        assert_eq!(b.prepare_step(), PrepareStep::Answer(Vote::Yes { xid: 42 }));
        assert!(matches!(
            b.check_execute(),
            Err(BranchError::NotActive { .. })
        ));
        assert_eq!(b.commit_step(), Ok(CommitStep::CommitPrepared { xid: 42 }));
        b.state = State::Committed;
        assert_eq!(b.commit_step(), Ok(CommitStep::AlreadyDone));
        assert!(matches!(
            b.rollback_step(),
            Err(BranchError::AlreadyCommitted { .. })
        ));
    }

    #[test]
    fn a_rolled_back_branch_cannot_be_committed() {
        let mut b = branch();
        b.state = State::RolledBack;
        assert!(matches!(
            b.commit_step(),
            Err(BranchError::NotPrepared { .. })
        ));
        assert_eq!(b.rollback_step(), Ok(RollbackStep::AlreadyDone));
        assert!(matches!(
            b.prepare_step(),
            PrepareStep::Answer(Vote::No { .. })
        ));
    }

    #[test]
    fn an_active_branch_cannot_be_committed_without_prepare() {
        assert!(matches!(
            branch().commit_step(),
            Err(BranchError::NotPrepared { .. })
        ));
    }
}
