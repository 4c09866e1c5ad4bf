//! The participant's errors, and the one place they become gRPC statuses.

use super::branch::BranchError;
use super::postgres::describe;
use super::sql::SqlError;
use crate::proto::TxnId;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    CoordinatorId(#[from] crate::proto::names::InvalidName),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Branch(#[from] BranchError),
    /// A statement failed in PostgreSQL: the branch is doomed.
    #[error("statement failed, so transaction {txn} can now only abort: {message}")]
    Statement {
        txn: TxnId,
        message: String,
        sqlstate: Option<String>,
    },
    #[error("{0}")]
    Unavailable(String),
    /// A limit was reached; the message names it.
    #[error("{0}")]
    ResourceExhausted(String),
    /// PostgreSQL failed outside a client's statement (pool, 2PC statements).
    #[error("PostgreSQL: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The coordinator answered RegisterBranch with an error.
    #[error("the coordinator refused the branch: {}", .0.message())]
    Coordinator(Status),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn statement(txn: TxnId, e: SqlError) -> Error {
        match e {
            SqlError::Refused(msg) => Error::InvalidArgument(msg),
            SqlError::OverLimit(msg) => Error::ResourceExhausted(format!(
                "statement failed, so transaction {txn} can now only abort: {msg}"
            )),
            SqlError::Failed { message, sqlstate } => Error::Statement {
                txn,
                message,
                sqlstate,
            },
        }
    }
}

/// The status for a statement of a service's own that failed in PostgreSQL (the work of
/// `Embedded::transaction`): coded by its SQLSTATE as Execute codes it, which rides along as
/// `x-sqlstate`, so a caller's `transact` knows a deadlock's victim (40P01, ABORTED) from a
/// constraint (23xxx, FAILED_PRECONDITION) or a lost connection (UNAVAILABLE).
pub fn statement_status(e: &tokio_postgres::Error) -> Status {
    let sqlstate = e.as_db_error().map(|db| db.code().code().to_string());
    with_sqlstate(
        Status::new(statement_code(sqlstate.as_deref()), describe(e)),
        sqlstate,
    )
}

fn with_sqlstate(mut status: Status, sqlstate: Option<String>) -> Status {
    if let Some(Ok(v)) = sqlstate.map(|s| s.parse()) {
        status.metadata_mut().insert("x-sqlstate", v);
    }
    status
}

/// A failed statement's code, by SQLSTATE class: what the client can do about it.
fn statement_code(sqlstate: Option<&str>) -> Code {
    match sqlstate.map(|s| &s[..2.min(s.len())]) {
        Some("22" | "42" | "54") => Code::InvalidArgument,
        Some("23") => Code::FailedPrecondition,
        Some("40") => Code::Aborted,
        // query_canceled (statement_timeout, a cancel): retrying the call cannot help, the
        // branch is doomed.
        _ if sqlstate == Some("57014") => Code::Aborted,
        Some("53") => Code::ResourceExhausted,
        Some("08" | "57") | None => Code::Unavailable,
        _ => Code::Aborted,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) | Error::CoordinatorId(_) => Status::invalid_argument(msg),
            Error::NotFound(_) => Status::not_found(msg),
            Error::FailedPrecondition(_) | Error::Branch(_) => Status::failed_precondition(msg),
            Error::Statement { sqlstate, .. } => with_sqlstate(
                Status::new(statement_code(sqlstate.as_deref()), msg),
                sqlstate,
            ),
            Error::Unavailable(_) => Status::unavailable(msg),
            Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
            Error::Postgres(e) if e.as_db_error().is_none() => Status::unavailable(msg),
            Error::Postgres(_) | Error::Internal(_) => Status::internal(msg),
            Error::Coordinator(s) => match s.code() {
                // With the coordinator's metadata: a `stale epoch` refusal carries the epoch
                // to start again in (`twopc-epoch`).
                Code::NotFound | Code::FailedPrecondition | Code::InvalidArgument => {
                    Status::with_metadata(s.code(), msg, s.metadata().clone())
                }
                _ => Status::unavailable(format!(
                    "the coordinator is not reachable: {}",
                    s.message()
                )),
            },
        }
    }
}
