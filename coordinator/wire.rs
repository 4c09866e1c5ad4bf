//! The one place the coordinator's state machines meet the `twopc.v1` types: states, outcomes,
//! transactions and sagas out, state filters in. Keeping it in one place keeps the two from
//! drifting (an unspecified state, say, is refused here and nowhere else).

use super::error::Error;
use super::saga::{Saga, SagaState, StepState};
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

impl From<SagaState> for proto::SagaState {
    fn from(s: SagaState) -> Self {
        match s {
            SagaState::Running => proto::SagaState::Running,
            SagaState::Completed => proto::SagaState::Completed,
            SagaState::Compensating => proto::SagaState::Compensating,
            SagaState::Compensated => proto::SagaState::Compensated,
            SagaState::Stuck => proto::SagaState::Stuck,
        }
    }
}

impl From<&StepState> for proto::SagaStepState {
    fn from(s: &StepState) -> Self {
        match s {
            StepState::Pending => proto::SagaStepState::Pending,
            StepState::Running => proto::SagaStepState::Running,
            StepState::Unknown => proto::SagaStepState::Unknown,
            StepState::Succeeded => proto::SagaStepState::Succeeded,
            StepState::Failed => proto::SagaStepState::Failed,
            StepState::Exhausted => proto::SagaStepState::Exhausted,
            StepState::Compensating => proto::SagaStepState::Compensating,
            StepState::Uncompensated => proto::SagaStepState::Uncompensated,
            StepState::Compensated => proto::SagaStepState::Compensated,
        }
    }
}

/// A saga state a client asks to filter on.
pub fn saga_state_from_proto(n: i32) -> Result<SagaState, Error> {
    Ok(match proto::SagaState::try_from(n) {
        Ok(proto::SagaState::Running) => SagaState::Running,
        Ok(proto::SagaState::Completed) => SagaState::Completed,
        Ok(proto::SagaState::Compensating) => SagaState::Compensating,
        Ok(proto::SagaState::Compensated) => SagaState::Compensated,
        Ok(proto::SagaState::Stuck) => SagaState::Stuck,
        Ok(proto::SagaState::Unspecified) | Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "unknown saga state {n} in states"
            )));
        }
    })
}

/// A saga for GetSaga, ListSagas and SubmitSaga's answer.
pub fn saga(s: &Saga) -> proto::Saga {
    // Which steps' actions are gRPC calls, whose output is a response's bytes.
    let plan: proto::SubmitSagaRequest =
        prost::Message::decode(s.plan.as_slice()).unwrap_or_default();
    let grpc = |i: usize| {
        plan.steps.get(i).is_some_and(|st| {
            matches!(
                st.action.as_ref().and_then(|a| a.call.as_ref()),
                Some(proto::saga_call::Call::Grpc(_))
            )
        })
    };
    proto::Saga {
        saga_id: s.id.clone(),
        state: proto::SagaState::from(s.state) as i32,
        reason: s.reason.clone(),
        steps: s
            .steps
            .iter()
            .enumerate()
            .map(|(i, step)| proto::SagaStep {
                name: step.name.clone(),
                state: proto::SagaStepState::from(&step.state) as i32,
                attempts: step.attempts,
                compensations: step.compensations,
                last_error: step.last_error.clone(),
                output: match grpc(i) {
                    true => None,
                    false => step
                        .output
                        .as_deref()
                        .and_then(|o| prost::Message::decode(o).ok()),
                },
                response: match grpc(i) {
                    true => step.output.clone().unwrap_or_default(),
                    false => Vec::new(),
                },
            })
            .collect(),
        created_unix_ms: s.created_ms,
        finished_unix_ms: s.finished_ms,
    }
}
