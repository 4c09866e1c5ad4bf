//! The coordinator's errors, and the one place they become gRPC statuses.

use super::epoch::Refusal;
use super::log::LogError;
use super::txn::TxnError;
use crate::proto::TxnId;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller may not do this here (a participant not on the allowed list).
    #[error("{0}")]
    NotAllowed(String),
    /// A limit was reached; the message names it.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A participant endpoint this coordinator cannot dial as configured (TLS or not).
    #[error("{0}")]
    EndpointRefused(String),
    #[error("unknown transaction {0}: it was never begun here, or it finished long ago")]
    NotFound(TxnId),
    #[error(transparent)]
    Txn(#[from] TxnError),
    #[error(transparent)]
    Log(#[from] LogError),
    /// A first enlistment that may not create its transaction (`epoch.rs`).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A question about a transaction of another coordinator: presuming abort for it here
    /// could undo its commit.
    #[error("this is coordinator {ours:?}; transaction {id} belongs to coordinator {owner:?}")]
    NotOurs {
        id: TxnId,
        ours: String,
        owner: String,
    },
    /// A saga plan that cannot run (INVALID_ARGUMENT), with what is wrong.
    #[error("{0}")]
    Plan(String),
    #[error("unknown saga {0:?}: it was never submitted here, or it finished long ago")]
    SagaNotFound(String),
    /// A saga id submitted again with another plan.
    #[error("{0}")]
    SagaConflict(String),
    #[error("the coordinator is shutting down; retry against a running coordinator")]
    ShuttingDown,
    #[error(
        "the outcome of transaction {id} rests with participant {participant_id:?}, which commits it in one phase and has not answered yet ({last_error}); the coordinator keeps asking it: call Commit again"
    )]
    OutcomeAtParticipant {
        id: TxnId,
        participant_id: String,
        last_error: String,
    },
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) | Error::Plan(_) => Status::invalid_argument(msg),
            Error::NotFound(_) | Error::SagaNotFound(_) => Status::not_found(msg),
            Error::SagaConflict(_) => Status::failed_precondition(msg),
            Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
            Error::NotAllowed(_) => Status::permission_denied(msg),
            Error::Txn(_) | Error::EndpointRefused(_) | Error::NotOurs { .. } => {
                Status::failed_precondition(msg)
            }
            Error::Log(_) => Status::internal(msg),
            Error::Refused(Refusal::Stale { ours, .. }) => {
                let mut status = Status::failed_precondition(msg);
                status.metadata_mut().insert(
                    crate::proto::EPOCH_METADATA,
                    ours.to_string().parse().expect("digits"),
                );
                status
            }
            Error::Refused(_) => Status::invalid_argument(msg),
            Error::ShuttingDown | Error::OutcomeAtParticipant { .. } => Status::unavailable(msg),
        }
    }
}
