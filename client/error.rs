//! What can go wrong for a client, typed so that a caller can match on it: above all
//! [`Error::Aborted`], the transaction's own outcome, apart from everything that says nothing
//! about it.

use tonic::Code;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The transaction aborted: Commit said so, or it was aborted before (by this client, a
    /// nested `transact` that failed, its deadline, an operator, or as a deadlock's victim).
    /// Nothing it did is in any database.
    #[error("transaction aborted: {reason}")]
    Aborted {
        reason: String,
        /// The SQLSTATE of the cause, when it has one (`40P01`: a distributed deadlock, which
        /// is worth retrying; `23505`: a unique violation, which is not).
        sqlstate: Option<String>,
    },
    /// A statement failed. Its branch is doomed: the transaction can now only abort.
    #[error("statement failed ({code:?}): {message}")]
    Statement {
        code: Code,
        message: String,
        sqlstate: Option<String>,
    },
    /// The request was refused as it stands (a bad id, SQL the participant refuses, a value
    /// that does not convert); retrying it unchanged cannot help.
    #[error("invalid: {0}")]
    Invalid(String),
    /// No answer, or not one that tells how the transaction ended: for Commit, ask again (it
    /// is idempotent) or look the transaction up; its outcome is the coordinator's.
    #[error("{code:?}: {message}")]
    Rpc { code: Code, message: String },
}

impl Error {
    /// A statement's or a call's status, sorted into what a caller can do about it.
    pub fn from_status(status: &tonic::Status) -> Error {
        let sqlstate = status
            .metadata()
            .get("x-sqlstate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let message = status.message().to_string();
        match (status.code(), sqlstate) {
            (code, Some(sqlstate)) => Error::Statement {
                code,
                message,
                sqlstate: Some(sqlstate),
            },
            (Code::InvalidArgument | Code::NotFound, None) => Error::Invalid(message),
            (code, None) => Error::Rpc { code, message },
        }
    }

    /// The SQLSTATE behind the error, if there is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Aborted { sqlstate, .. } | Error::Statement { sqlstate, .. } => {
                sqlstate.as_deref()
            }
            _ => None,
        }
    }

    /// A distributed (or local) deadlock's victim: running the whole transaction again may
    /// well succeed.
    pub fn is_deadlock(&self) -> bool {
        self.sqlstate() == Some("40P01")
    }

    /// Whether a retry of an idempotent call may get through (the server was not reached, or
    /// was busy).
    pub(super) fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Rpc {
                code: Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Unknown,
                ..
            }
        )
    }
}

/// The SQLSTATE a coordinator's abort reason quotes ("… (SQLSTATE 23514)"), if any.
pub(super) fn sqlstate_in(reason: &str) -> Option<String> {
    let at = reason.rfind("SQLSTATE ")? + "SQLSTATE ".len();
    let code: String = reason[at..].chars().take(5).collect();
    (code.len() == 5 && code.chars().all(|c| c.is_ascii_alphanumeric())).then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_quoting_a_sqlstate_yields_it() {
        let reason =
            "participant p1 voted no: ERROR new row violates check constraint (SQLSTATE 23514)";
        assert_eq!(sqlstate_in(reason).as_deref(), Some("23514"));
        assert_eq!(sqlstate_in("aborted by the client"), None);
        assert_eq!(sqlstate_in("SQLSTATE 4"), None);
    }

    #[test]
    fn a_failed_statement_carries_its_sqlstate_and_a_deadlock_is_known_by_it() {
        let mut status = tonic::Status::aborted("distributed deadlock");
        status
            .metadata_mut()
            .insert("x-sqlstate", "40P01".parse().unwrap());

        let error = Error::from_status(&status);

        assert!(error.is_deadlock(), "{error:?}");
        assert!(matches!(
            error,
            Error::Statement {
                code: Code::Aborted,
                ..
            }
        ));
    }
}
