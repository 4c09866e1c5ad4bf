//! The one place the coordinator's state machine meets the `twopc.v1` types: states, outcomes
//! and transactions out, state filters in. Keeping it in one place keeps the two from
//! drifting (an unspecified state, say, is refused here and nowhere else).

use super::error::Error;
use super::transactions::Shown;
use super::txn::{BranchState, Outcome, State};
use crate::proto;

impl From<State> for proto::TxnState {
    fn from(s: State) -> Self {
        match s {
            State::Active => proto::TxnState::Active,
            // Delegated to its participant, but still undecided as far as a client can tell.
            State::Preparing | State::OnePhase => proto::TxnState::Preparing,
            State::Committing => proto::TxnState::Committing,
            State::Committed => proto::TxnState::Committed,
            State::Aborting => proto::TxnState::Aborting,
            State::Aborted => proto::TxnState::Aborted,
        }
    }
}

/// A state a client asks to filter on. Unspecified or unknown numbers are the caller's error.
pub fn state_from_proto(n: i32) -> Result<State, Error> {
    Ok(match proto::TxnState::try_from(n) {
        Ok(proto::TxnState::Active) => State::Active,
        Ok(proto::TxnState::Preparing) => State::Preparing,
        Ok(proto::TxnState::Committing) => State::Committing,
        Ok(proto::TxnState::Committed) => State::Committed,
        Ok(proto::TxnState::Aborting) => State::Aborting,
        Ok(proto::TxnState::Aborted) => State::Aborted,
        Ok(proto::TxnState::Unspecified) | Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "unknown transaction state {n} in states"
            )));
        }
    })
}

impl From<BranchState> for proto::BranchState {
    fn from(s: BranchState) -> Self {
        match s {
            BranchState::Active => proto::BranchState::Active,
            BranchState::Preparing => proto::BranchState::Preparing,
            BranchState::Prepared => proto::BranchState::Prepared,
            BranchState::ReadOnly => proto::BranchState::ReadOnly,
            BranchState::Failed => proto::BranchState::Failed,
            BranchState::Committed => proto::BranchState::Committed,
            BranchState::RolledBack => proto::BranchState::RolledBack,
            BranchState::Abandoned => proto::BranchState::Abandoned,
        }
    }
}

impl From<Outcome> for proto::Outcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Pending => proto::Outcome::Pending,
            Outcome::Committed => proto::Outcome::Committed,
            Outcome::Aborted => proto::Outcome::Aborted,
        }
    }
}

/// A transaction as clients see it.
pub fn transaction(shown: &Shown) -> proto::Transaction {
    let (txn, announced) = (&shown.txn, shown.announced);
    proto::Transaction {
        txn_id: txn.id.to_string(),
        state: proto::TxnState::from(txn.shown_state(announced)) as i32,
        outcome: proto::Outcome::from(announced) as i32,
        label: txn.label.clone(),
        begun_by: txn.begun_by.clone(),
        branches: txn
            .branches
            .iter()
            .map(|b| proto::Branch {
                participant_id: b.participant_id.clone(),
                endpoint: b.endpoint.clone(),
                state: proto::BranchState::from(b.state) as i32,
                xid: b.xid,
            })
            .collect(),
        created_unix_ms: txn.created_ms,
        deadline_unix_ms: txn.deadline_ms,
        decided_unix_ms: txn.decided_ms,
        finished_unix_ms: txn.finished_ms,
        reason: txn.reason.clone(),
    }
}
