//! The participant's database, as the branch table (`branches.rs`) needs it.
//!
//! The table is generic over [`Database`], as the coordinator is over its log:
//! [`Postgres`](super::postgres::Postgres) in the binary, and in tests an in-memory fake that
//! keeps open and prepared transactions the way PostgreSQL does (prepared ones survive a
//! restart, open ones do not), so the branch table and the in-doubt resolver are tested crash by
//! crash without a server.
//!
//! One rule every implementation shares lives here, not in an implementation: what a phase-2
//! request means when its gid is already gone ([`settle_gone`]).

use super::barrier::{StepAnswer, StepCall};
use super::error::Error;
use super::gid::Gid;
use super::statement::{Datum, Limits, Rows, SqlError};
use crate::proto::marker::MarkerSecret;
use crate::proto::vote::OnePhaseOutcome;
use std::future::Future;
use std::time::Duration;

/// How PREPARE TRANSACTION went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// Prepared, and seen in `pg_prepared_xacts`, with its xid8.
    Yes { xid: u64 },
    /// Nothing was written: its (empty) prepared transaction was committed at once.
    ReadOnly,
    /// PostgreSQL rolled the transaction back instead of preparing it.
    No { reason: String },
}

/// How a transaction ended, by `pg_xact_status` of its xid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XactStatus {
    Committed,
    Aborted,
    InProgress,
    /// Too old for the commit log to tell, or not a valid xid.
    Unknown,
}

/// A branch prepared in the database: what `pg_prepared_xacts` says of one of our gids.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedBranch {
    pub gid: Gid,
    /// How long ago it was prepared, in seconds.
    pub age_s: f64,
    /// Its xid8 (0 if it could not be widened).
    pub xid: u64,
}

/// A session waiting for a lock that other sessions hold, as the database sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockWait {
    /// The waiting session (one of the `of` asked about).
    pub waiter: i32,
    /// A session holding (or queued ahead for) the lock; 0 for a prepared transaction.
    pub holder: i32,
    /// The holder for a person: `pid 4242 (psql): UPDATE …`, or a prepared transaction's gid.
    pub holder_text: String,
    /// The holder's gid, when it is a prepared transaction that the database could name.
    pub holder_gid: Option<String>,
    pub waited_ms: u32,
    /// What is waited for (`transactionid`, `tuple on acct`, ...).
    pub lock: String,
}

/// The database side of a participant. A connection ([`Database::Conn`]) carries one branch's
/// open transaction from its first statement until it is prepared or rolled back.
pub trait Database: Send + Sync + 'static {
    /// One session, owned by one branch while its transaction is open.
    type Conn: Send + Sync + 'static;
    /// Reaches the statement running on a connection without its lock.
    type Cancel: Send + Sync + 'static;

    /// A session for a new branch. Failing here dooms nothing: nothing has run yet.
    fn conn(&self) -> impl Future<Output = Result<Self::Conn, Error>> + Send;

    /// How to cancel what runs on `conn` later.
    fn cancel_handle(conn: &Self::Conn) -> Self::Cancel;

    /// The server process behind `conn`, by which the database names it in its lock tables
    /// (known for every connection [`Database::conn`] hands out).
    fn backend_pid(&self, conn: &Self::Conn) -> Option<i32>;

    /// Which of the sessions `of` have waited at least `min_wait` for a lock, and on whom.
    fn lock_waits(
        &self,
        of: &[i32],
        min_wait: Duration,
    ) -> impl Future<Output = Result<Vec<LockWait>, Error>> + Send;

    /// Cancels the statement running on the connection `cancel` belongs to, if any.
    fn cancel(&self, cancel: &Self::Cancel) -> impl Future<Output = ()> + Send;

    /// What one Execute may carry and return. The participant checks a request against it
    /// before it opens a branch or takes a connection, so a refused request leaves nothing
    /// behind: in particular no connection on which BEGIN was never sent.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// Opens the branch's transaction on `conn` (for work that runs its own statements on it:
    /// `Participant::with_branch`).
    fn begin(&self, conn: &Self::Conn) -> impl Future<Output = Result<(), SqlError>> + Send;

    /// Runs a client's statement in the branch; with `begin`, opens its transaction first.
    fn execute(
        &self,
        conn: &Self::Conn,
        sql: &str,
        params: &[Datum],
        begin: bool,
    ) -> impl Future<Output = Result<Rows, SqlError>> + Send;

    /// Phase 1 on the branch's connection, which is then released (or, if its state is
    /// unknown after an error, closed).
    fn prepare(
        &self,
        conn: Self::Conn,
        gid: &Gid,
    ) -> impl Future<Output = Result<Prepared, Error>> + Send;

    /// Rolls back an open transaction and releases its connection (or closes it: that rolls
    /// back all the same).
    fn roll_back_open(&self, conn: Self::Conn) -> impl Future<Output = ()> + Send;

    /// COMMIT PREPARED (`commit`) or ROLLBACK PREPARED of a gid; if the gid is gone, what
    /// [`settle_gone`] says of it.
    fn finish_prepared(
        &self,
        gid: &Gid,
        xid: u64,
        commit: bool,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The xid8 of a prepared gid, if it is prepared.
    fn prepared_xid(&self, gid: &Gid) -> impl Future<Output = Result<Option<u64>, Error>> + Send;

    /// Our branches prepared at least `min_age` ago, oldest first.
    fn prepared_older_than(
        &self,
        min_age: Duration,
    ) -> impl Future<Output = Result<Vec<PreparedBranch>, Error>> + Send;

    /// It keeps one-phase markers (its outcome table is there and writable), so it can
    /// commit a lone branch in one phase and tell later whether it did.
    fn one_phase(&self) -> bool;

    /// One-phase commit on the branch's connection, which is then released: COMMIT, with the
    /// branch's marker under `secret` (if it wrote anything) and the deletion of the `forget`
    /// markers in the same local transaction. `Err`: the connection broke, so whether it
    /// committed is unknown until [`Database::one_phase_outcome`] is asked.
    fn commit_one_phase(
        &self,
        conn: Self::Conn,
        gid: &Gid,
        secret: &MarkerSecret,
        forget: &[MarkerSecret],
    ) -> impl Future<Output = Result<OnePhaseOutcome, Error>> + Send;

    /// Whether the one-phase branch whose marker `secret` addresses committed: `Some(true)`
    /// committed, `Some(false)` fenced off. With `fence`, a secret with no marker gets a "did
    /// not commit" one first (waiting for a commit under it still in flight), so the answer is
    /// always `Some` and final; without, it is `None`. (`gid` names it in messages.)
    fn one_phase_outcome(
        &self,
        gid: &Gid,
        secret: &MarkerSecret,
        fence: bool,
    ) -> impl Future<Output = Result<Option<bool>, Error>> + Send;

    /// Deletes markers older than `age` (the database refuses to go below its own floor,
    /// `MARKER_RETENTION`); returns how many.
    fn prune_one_phase_markers(
        &self,
        age: Duration,
    ) -> impl Future<Output = Result<u64, Error>> + Send;

    /// One saga step in a local transaction of its own, with its barrier row (`barrier.rs`).
    /// `Err`: it did not run to an answer (the database is down, a transient failure): safe to
    /// send again.
    fn saga_step(
        &self,
        _call: &StepCall,
    ) -> impl Future<Output = Result<StepAnswer, Error>> + Send {
        async {
            Err(Error::FailedPrecondition(
                "this participant's database runs no saga steps".into(),
            ))
        }
    }
}

/// A phase-2 request found its gid gone: it finished earlier (a repeat after a lost reply), or
/// it was never prepared. `status` is how its xid ended (`None` when no xid was given). Only a
/// branch that really ended the asked way is success; the contrary is an ATOMICITY ALARM.
pub fn settle_gone(
    gid: &Gid,
    xid: u64,
    commit: bool,
    status: Option<XactStatus>,
) -> Result<(), Error> {
    let Some(status) = status.filter(|_| xid != 0) else {
        return if commit {
            Err(Error::FailedPrecondition(format!(
                "{gid} is not prepared here and no xid was given to check whether it committed"
            )))
        } else {
            // Nothing is prepared under this gid, so nothing can commit: rolled back.
            Ok(())
        };
    };
    match (commit, status) {
        (true, XactStatus::Committed) | (false, XactStatus::Aborted) => Ok(()),
        (_, XactStatus::InProgress) => Err(Error::Unavailable(format!(
            "{gid} (xid {xid}) is still in progress; retry"
        ))),
        (false, XactStatus::Unknown) => {
            tracing::warn!(%gid, xid, "gid gone and xid too old to check; taking the rollback as done");
            Ok(())
        }
        (true, XactStatus::Unknown) => Err(Error::FailedPrecondition(format!(
            "{gid} is not prepared here and xid {xid} is too old (or invalid) for pg_xact_status to tell whether it committed"
        ))),
        (_, status) => {
            tracing::error!(%gid, xid, ?status, expected = if commit { "committed" } else { "rolled back" },
                "ATOMICITY ALARM: a branch did not end the way the coordinator decided");
            super::ALARMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("twopc_atomicity_alarms_total").increment(1);
            Err(Error::FailedPrecondition(format!(
                "ATOMICITY ALARM: {gid} (xid {xid}) is {status:?} in PostgreSQL, but the coordinator asked to {}",
                if commit { "commit it" } else { "roll it back" }
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TxnId;

    fn gid() -> Gid {
        Gid::new("c1", TxnId::generate()).unwrap()
    }

    #[test]
    fn a_repeat_after_a_lost_reply_is_success() {
        assert!(settle_gone(&gid(), 9, true, Some(XactStatus::Committed)).is_ok());
        assert!(settle_gone(&gid(), 9, false, Some(XactStatus::Aborted)).is_ok());
        assert!(
            settle_gone(&gid(), 0, false, None).is_ok(),
            "never prepared: rolled back"
        );
    }

    #[test]
    fn a_branch_that_ended_the_other_way_is_an_alarm() {
        let alarm = settle_gone(&gid(), 9, true, Some(XactStatus::Aborted)).unwrap_err();
        assert!(alarm.to_string().contains("ATOMICITY ALARM"));
        assert!(settle_gone(&gid(), 9, false, Some(XactStatus::Committed)).is_err());
    }

    #[test]
    fn a_commit_that_cannot_be_checked_is_refused_not_assumed() {
        assert!(matches!(
            settle_gone(&gid(), 0, true, None),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            settle_gone(&gid(), 9, true, Some(XactStatus::Unknown)),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            settle_gone(&gid(), 9, true, Some(XactStatus::InProgress)),
            Err(Error::Unavailable(_))
        ));
    }
}
