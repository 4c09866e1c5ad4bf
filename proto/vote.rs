//! A participant's answer to Prepare, as both sides of the protocol reason about it.
//!
//! The wire form (`PrepareResponse`: an enum, a reason and an xid that only some votes use)
//! admits combinations the protocol does not; this form does not. Both the participant (which
//! gives votes) and the coordinator (which counts them) use it, and this is the one place it
//! becomes the wire form and back.

use super::PrepareResponse;

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

#[cfg(test)]
mod tests {
    use super::*;

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
