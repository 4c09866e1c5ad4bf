//! The coordinator's errors, and the one place they become gRPC statuses.

use super::log::LogError;
use super::txn::TxnError;
use crate::proto::TxnId;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("unknown transaction {0}: it was never begun here, or it finished long ago")]
    NotFound(TxnId),
    #[error(transparent)]
    Txn(#[from] TxnError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the coordinator is shutting down; retry against a running coordinator")]
    ShuttingDown,
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::NotFound(_) => Status::not_found(msg),
            Error::Txn(_) => Status::failed_precondition(msg),
            Error::Log(_) => Status::internal(msg),
            Error::ShuttingDown => Status::unavailable(msg),
        }
    }
}
