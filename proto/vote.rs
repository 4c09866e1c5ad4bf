//! A participant's answers to Prepare and to CommitOnePhase, as both sides of the protocol
//! reason about them.
//!
//! The wire forms (`PrepareResponse`: an enum, a reason and an xid that only some votes use;
//! `CommitOnePhaseResponse` likewise) admit combinations the protocol does not; these forms do
//! not. Both the participant (which answers) and the coordinator (which acts on the answer) use
//! them, and this is the one place they become the wire form and back.

use super::{CommitOnePhaseResponse, Outcome, PrepareResponse};

/// How a branch answered phase 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vote {
    /// Prepared: it can commit. `xid` is its PostgreSQL xid8, with which a participant can
    /// later tell whether it committed even after the gid is gone.
    Yes { xid: u64 },
    /// It wrote nothing, so it already finished: phase 2 has nothing to do on it.
    ReadOnly,
    /// It cannot commit. Anything that is not a clear yes counts as this, a lost reply too.
    No { reason: String },
}

impl From<Vote> for PrepareResponse {
    fn from(vote: Vote) -> Self {
        let (vote, reason, xid) = match vote {
            Vote::Yes { xid } => (super::Vote::Yes, String::new(), xid),
            Vote::ReadOnly => (super::Vote::ReadOnly, String::new(), 0),
            Vote::No { reason } => (super::Vote::No, reason, 0),
        };
        PrepareResponse {
            vote: vote as i32,
            reason,
            xid,
        }
    }
}

impl From<PrepareResponse> for Vote {
    /// A vote the coordinator cannot read (unspecified, or from a newer participant) is a no.
    fn from(resp: PrepareResponse) -> Self {
        match resp.vote() {
            super::Vote::Yes => Vote::Yes { xid: resp.xid },
            super::Vote::ReadOnly => Vote::ReadOnly,
            super::Vote::No | super::Vote::Unspecified => Vote::No {
                reason: resp.reason,
            },
        }
    }
}

/// How the lone branch of a one-phase commit ended: the transaction's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnePhaseOutcome {
    /// Its COMMIT succeeded (`read_only`: with nothing written, so no marker was kept).
    Committed { read_only: bool },
    /// Its transaction rolled back, or it was gone and is now fenced off.
    Aborted { reason: String },
}

impl From<OnePhaseOutcome> for CommitOnePhaseResponse {
    fn from(o: OnePhaseOutcome) -> Self {
        let (outcome, reason, read_only) = match o {
            OnePhaseOutcome::Committed { read_only } => {
                (Outcome::Committed, String::new(), read_only)
            }
            OnePhaseOutcome::Aborted { reason } => (Outcome::Aborted, reason, false),
        };
        CommitOnePhaseResponse {
            outcome: outcome as i32,
            reason,
            read_only,
        }
    }
}

impl TryFrom<CommitOnePhaseResponse> for OnePhaseOutcome {
    /// The outcome number that is neither committed nor aborted: not an answer at all.
    type Error = i32;

    fn try_from(resp: CommitOnePhaseResponse) -> Result<Self, i32> {
        match Outcome::try_from(resp.outcome) {
            Ok(Outcome::Committed) => Ok(OnePhaseOutcome::Committed {
                read_only: resp.read_only,
            }),
            Ok(Outcome::Aborted) => Ok(OnePhaseOutcome::Aborted {
                reason: resp.reason,
            }),
            _ => Err(resp.outcome),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_phase_outcome_round_trips_and_pending_is_no_answer() {
        for o in [
            OnePhaseOutcome::Committed { read_only: true },
            OnePhaseOutcome::Committed { read_only: false },
            OnePhaseOutcome::Aborted {
                reason: "40001".into(),
            },
        ] {
            let back = OnePhaseOutcome::try_from(CommitOnePhaseResponse::from(o.clone()));
            assert_eq!(back, Ok(o));
        }
        let pending = CommitOnePhaseResponse {
            outcome: Outcome::Pending as i32,
            ..Default::default()
        };
        assert!(OnePhaseOutcome::try_from(pending).is_err());
    }

    #[test]
    fn round_trips_through_the_wire() {
        for vote in [
            Vote::Yes { xid: 42 },
            Vote::ReadOnly,
            Vote::No {
                reason: "23505".into(),
            },
        ] {
            assert_eq!(Vote::from(PrepareResponse::from(vote.clone())), vote);
        }
    }

    #[test]
    fn an_unreadable_vote_is_a_no() {
        let resp = PrepareResponse {
            vote: 99,
            reason: String::new(),
            xid: 7,
        };
        assert!(matches!(Vote::from(resp), Vote::No { .. }));
    }
}
