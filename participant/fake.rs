//! A participant's peers in memory, for tests: a database that keeps transactions the way
//! PostgreSQL does, and a coordinator that answers as it is told.
//!
//! [`FakeDatabase`] understands just enough SQL to tell the branch table's cases apart: a
//! statement containing `fail` fails (dooming the branch), one containing `sleep` blocks until
//! cancelled, one that starts with `insert`/`update`/`delete` writes (so the branch gets an
//! xid), anything else only reads. Its prepared transactions survive [`FakeDatabase::restart`],
//! its open ones do not: what a PostgreSQL restart, or a participant process's death (its
//! connections close), leaves behind.
//!
//! State sits behind std mutexes, outside any runtime, because tests drop a participant's whole
//! runtime to crash it while the database lives on.

use super::database::{Database, LockWait, Prepared, PreparedBranch, XactStatus, settle_gone};
use super::error::Error;
use super::gid::Gid;
use super::link::{CoordinatorLink, Enlisted};
use super::statement::{Datum, Rows, SqlError};
use crate::proto::marker::MarkerSecret;
use crate::proto::vote::OnePhaseOutcome;
use crate::proto::{Outcome, TxnId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An in-memory database. Cloning shares it.
#[derive(Clone, Default)]
pub struct FakeDatabase {
    inner: Arc<Mutex<Db>>,
}

#[derive(Default)]
struct Db {
    next_xid: u64,
    next_conn: u64,
    /// Open transactions by connection: their xid once they wrote.
    open: HashMap<u64, Option<u64>>,
    /// `pg_prepared_xacts`: gid → xid.
    prepared: BTreeMap<String, u64>,
    /// `pg_xact_status` of every ended xid.
    ended: HashMap<u64, XactStatus>,
    /// The next PREPARE breaks the connection, after preparing (`Some(true)`) or before.
    break_prepare: Option<bool>,
    /// `twopc.one_phase_markers`: secret → (gid, committed). The real table keeps the
    /// secret's SHA-256; the fake needs no hashing to be addressed the same way.
    markers: BTreeMap<Vec<u8>, (String, bool)>,
    /// The next one-phase COMMIT breaks the connection, after committing (`Some(true)`) or
    /// before.
    break_one_phase: Option<bool>,
    /// A one-phase commit fails at COMMIT (a deferred constraint).
    refuse_one_phase: bool,
    /// What `lock_waits` reports (a test sets it: the fake has no locks of its own).
    waits: Vec<LockWait>,
}

/// A session of the fake database.
pub struct FakeConn {
    id: u64,
    /// Wakes a statement blocked in `sleep`.
    cancelled: Arc<tokio::sync::Notify>,
}

impl FakeDatabase {
    /// The database restarts: open transactions are lost (aborted), prepared ones stay.
    pub fn restart(&self) {
        let mut db = self.inner.lock().unwrap();
        let open: Vec<Option<u64>> = db.open.drain().map(|(_, xid)| xid).collect();
        for xid in open.into_iter().flatten() {
            db.ended.insert(xid, XactStatus::Aborted);
        }
    }

    /// The gids prepared now.
    pub fn prepared(&self) -> Vec<String> {
        self.inner
            .lock()
            .unwrap()
            .prepared
            .keys()
            .cloned()
            .collect()
    }

    /// How the transaction with this xid ended, if it has.
    pub fn status(&self, xid: u64) -> Option<XactStatus> {
        self.inner.lock().unwrap().ended.get(&xid).copied()
    }

    /// Open transactions: connections holding a branch.
    pub fn open_transactions(&self) -> usize {
        self.inner.lock().unwrap().open.len()
    }

    /// What the lock tables say from now on: sessions are named by connection, the first
    /// connection handed out being 1. A statement that waits must also contain `sleep`.
    pub fn set_waits(&self, waits: Vec<LockWait>) {
        self.inner.lock().unwrap().waits = waits;
    }

    /// Makes the next PREPARE break its connection, `after` preparing or before.
    pub fn break_next_prepare(&self, after: bool) {
        self.inner.lock().unwrap().break_prepare = Some(after);
    }

    /// Makes the next one-phase COMMIT break its connection, `after` committing or before.
    pub fn break_next_one_phase(&self, after: bool) {
        self.inner.lock().unwrap().break_one_phase = Some(after);
    }

    /// Makes every one-phase COMMIT fail, as a deferred constraint would.
    pub fn refuse_one_phase(&self, refuse: bool) {
        self.inner.lock().unwrap().refuse_one_phase = refuse;
    }

    /// The one-phase markers: gid → committed.
    pub fn markers(&self) -> BTreeMap<String, bool> {
        self.inner
            .lock()
            .unwrap()
            .markers
            .values()
            .cloned()
            .collect()
    }

    /// Prepares a branch as a previous run of the participant would have left it.
    pub fn prepare_directly(&self, gid: &Gid) -> u64 {
        let mut db = self.inner.lock().unwrap();
        db.next_xid += 1;
        let xid = db.next_xid;
        db.prepared.insert(gid.to_string(), xid);
        xid
    }

    /// Ends a prepared gid behind the participant's back (a DBA's COMMIT/ROLLBACK PREPARED).
    pub fn finish_directly(&self, gid: &Gid, commit: bool) {
        let mut db = self.inner.lock().unwrap();
        if let Some(xid) = db.prepared.remove(&gid.to_string()) {
            let status = if commit {
                XactStatus::Committed
            } else {
                XactStatus::Aborted
            };
            db.ended.insert(xid, status);
        }
    }
}

impl Database for FakeDatabase {
    type Conn = FakeConn;
    type Cancel = Arc<tokio::sync::Notify>;

    async fn conn(&self) -> Result<FakeConn, Error> {
        let mut db = self.inner.lock().unwrap();
        db.next_conn += 1;
        Ok(FakeConn {
            id: db.next_conn,
            cancelled: Arc::new(tokio::sync::Notify::new()),
        })
    }

    fn cancel_handle(conn: &FakeConn) -> Self::Cancel {
        Arc::clone(&conn.cancelled)
    }

    async fn begin(&self, conn: &FakeConn) -> Result<(), SqlError> {
        self.inner.lock().unwrap().open.insert(conn.id, None);
        Ok(())
    }

    fn backend_pid(&self, conn: &FakeConn) -> Option<i32> {
        i32::try_from(conn.id).ok()
    }

    async fn lock_waits(&self, of: &[i32], min_wait: Duration) -> Result<Vec<LockWait>, Error> {
        let db = self.inner.lock().unwrap();
        Ok(db
            .waits
            .iter()
            .filter(|w| of.contains(&w.waiter) && u128::from(w.waited_ms) >= min_wait.as_millis())
            .cloned()
            .collect())
    }

    async fn cancel(&self, cancel: &Self::Cancel) {
        cancel.notify_one();
    }

    async fn execute(
        &self,
        conn: &FakeConn,
        sql: &str,
        _params: &[Datum],
        begin: bool,
    ) -> Result<Rows, SqlError> {
        let lower = sql.to_ascii_lowercase();
        if begin {
            self.inner.lock().unwrap().open.insert(conn.id, None);
        }
        if lower.contains("sleep") {
            conn.cancelled.notified().await;
            return Err(SqlError::Failed {
                message: "ERROR canceling statement due to user request (SQLSTATE 57014)".into(),
                sqlstate: Some("57014".into()),
            });
        }
        if lower.contains("fail") {
            return Err(SqlError::Failed {
                message: "ERROR duplicate key value violates unique constraint (SQLSTATE 23505)"
                    .into(),
                sqlstate: Some("23505".into()),
            });
        }
        let writes = ["insert", "update", "delete"]
            .iter()
            .any(|w| lower.trim_start().starts_with(w));
        if writes {
            let mut db = self.inner.lock().unwrap();
            let next = db.next_xid + 1;
            let xid = db.open.get_mut(&conn.id).expect("a transaction is open");
            if xid.is_none() {
                *xid = Some(next);
                db.next_xid = next;
            }
        }
        Ok(Rows {
            rows_affected: u64::from(writes),
            ..Default::default()
        })
    }

    async fn prepare(&self, conn: FakeConn, gid: &Gid) -> Result<Prepared, Error> {
        let mut db = self.inner.lock().unwrap();
        let xid = db.open.remove(&conn.id).flatten();
        let broken = db.break_prepare.take();
        if broken == Some(false) {
            if let Some(xid) = xid {
                db.ended.insert(xid, XactStatus::Aborted);
            }
            return Err(Error::Unavailable("connection reset before PREPARE".into()));
        }
        let Some(xid) = xid else {
            return Ok(Prepared::ReadOnly);
        };
        db.prepared.insert(gid.to_string(), xid);
        if broken == Some(true) {
            return Err(Error::Unavailable("connection reset after PREPARE".into()));
        }
        Ok(Prepared::Yes { xid })
    }

    async fn roll_back_open(&self, conn: FakeConn) {
        let mut db = self.inner.lock().unwrap();
        if let Some(Some(xid)) = db.open.remove(&conn.id) {
            db.ended.insert(xid, XactStatus::Aborted);
        }
    }

    async fn finish_prepared(&self, gid: &Gid, xid: u64, commit: bool) -> Result<(), Error> {
        let mut db = self.inner.lock().unwrap();
        if let Some(prepared) = db.prepared.remove(&gid.to_string()) {
            let status = if commit {
                XactStatus::Committed
            } else {
                XactStatus::Aborted
            };
            db.ended.insert(prepared, status);
            return Ok(());
        }
        let status = (xid != 0).then(|| {
            let in_progress = db.open.values().any(|x| *x == Some(xid));
            match db.ended.get(&xid) {
                Some(s) => *s,
                None if in_progress => XactStatus::InProgress,
                None => XactStatus::Unknown,
            }
        });
        drop(db);
        settle_gone(gid, xid, commit, status)
    }

    async fn prepared_xid(&self, gid: &Gid) -> Result<Option<u64>, Error> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .prepared
            .get(&gid.to_string())
            .copied())
    }

    fn one_phase(&self) -> bool {
        true
    }

    async fn commit_one_phase(
        &self,
        conn: FakeConn,
        gid: &Gid,
        secret: &MarkerSecret,
        forget: &[MarkerSecret],
    ) -> Result<OnePhaseOutcome, Error> {
        let mut db = self.inner.lock().unwrap();
        let xid = db.open.remove(&conn.id).flatten();
        let broken = db.break_one_phase.take();
        let end = |db: &mut Db, status| {
            if let Some(xid) = xid {
                db.ended.insert(xid, status);
            }
        };
        if broken == Some(false) || db.refuse_one_phase {
            end(&mut db, XactStatus::Aborted);
            if broken == Some(false) {
                return Err(Error::Unavailable("connection reset before COMMIT".into()));
            }
            return Ok(OnePhaseOutcome::Aborted {
                reason: "ERROR deferred constraint (SQLSTATE 23503)".into(),
            });
        }
        end(&mut db, XactStatus::Committed);
        if xid.is_some() {
            db.markers
                .insert(secret.as_bytes().to_vec(), (gid.to_string(), true));
        }
        for f in forget {
            db.markers.remove(f.as_bytes());
        }
        if broken == Some(true) {
            return Err(Error::Unavailable("connection reset after COMMIT".into()));
        }
        Ok(OnePhaseOutcome::Committed {
            read_only: xid.is_none(),
        })
    }

    async fn one_phase_outcome(
        &self,
        gid: &Gid,
        secret: &MarkerSecret,
        fence: bool,
    ) -> Result<Option<bool>, Error> {
        let mut db = self.inner.lock().unwrap();
        if fence {
            db.markers
                .entry(secret.as_bytes().to_vec())
                .or_insert((gid.to_string(), false));
        }
        Ok(db.markers.get(secret.as_bytes()).map(|(_, c)| *c))
    }

    async fn prune_one_phase_markers(&self, _age: Duration) -> Result<u64, Error> {
        Ok(0)
    }

    async fn prepared_older_than(&self, _min_age: Duration) -> Result<Vec<PreparedBranch>, Error> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .prepared
            .iter()
            .filter_map(|(gid, xid)| {
                Some(PreparedBranch {
                    gid: Gid::parse(gid)?,
                    age_s: 0.0,
                    xid: *xid,
                })
            })
            .collect())
    }
}

/// A coordinator in memory: enlists every branch (or refuses, or is unreachable), and answers
/// QueryOutcome from the outcomes a test sets. Cloning shares it.
#[derive(Clone)]
pub struct FakeCoordinator {
    inner: Arc<Mutex<Coord>>,
}

struct Coord {
    id: String,
    deadline_ms: i64,
    reachable: bool,
    outcomes: HashMap<TxnId, Outcome>,
    /// (txn, participant instance) of every registration.
    registrations: Vec<(TxnId, String)>,
}

impl FakeCoordinator {
    /// Coordinator `id`, whose transactions all have `deadline_ms` (Unix ms).
    pub fn new(id: &str, deadline_ms: i64) -> Self {
        FakeCoordinator {
            inner: Arc::new(Mutex::new(Coord {
                id: id.to_string(),
                deadline_ms,
                reachable: true,
                outcomes: HashMap::new(),
                registrations: Vec::new(),
            })),
        }
    }

    /// What QueryOutcome answers for `txn` from now on (no entry: presumed abort).
    pub fn decide(&self, txn: TxnId, outcome: Outcome) {
        self.inner.lock().unwrap().outcomes.insert(txn, outcome);
    }

    pub fn set_reachable(&self, reachable: bool) {
        self.inner.lock().unwrap().reachable = reachable;
    }

    /// The participant instances that registered a branch of `txn`.
    pub fn registrations(&self, txn: TxnId) -> Vec<String> {
        let inner = self.inner.lock().unwrap();
        inner
            .registrations
            .iter()
            .filter(|(t, _)| *t == txn)
            .map(|(_, i)| i.clone())
            .collect()
    }
}

impl CoordinatorLink for FakeCoordinator {
    async fn register(
        &self,
        txn: TxnId,
        _start: Option<&crate::proto::Start>,
        _participant_id: &str,
        _endpoint: &str,
        instance: &str,
        _one_phase: bool,
    ) -> Result<Enlisted, tonic::Status> {
        let mut c = self.inner.lock().unwrap();
        if !c.reachable {
            return Err(tonic::Status::unavailable("connection refused"));
        }
        c.registrations.push((txn, instance.to_string()));
        Ok(Enlisted {
            coordinator_id: c.id.clone(),
            deadline_ms: c.deadline_ms,
        })
    }

    async fn query_outcome(
        &self,
        txn: TxnId,
        coordinator_id: &str,
        _timeout: Duration,
    ) -> Result<Outcome, tonic::Status> {
        let c = self.inner.lock().unwrap();
        if !c.reachable {
            return Err(tonic::Status::unavailable("connection refused"));
        }
        if coordinator_id != c.id {
            return Err(tonic::Status::failed_precondition("not this coordinator's"));
        }
        Ok(c.outcomes.get(&txn).copied().unwrap_or(Outcome::Aborted))
    }
}
