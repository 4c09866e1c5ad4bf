//! The participant's table of open branches, and the protocol steps on them.
//!
//! A branch appears on a transaction's first Execute here (after the coordinator accepts its
//! registration). Each open branch sits behind an async mutex, held across its database work,
//! so a Prepare waits for a running statement and a repeated Commit waits for the first.
//!
//! A branch that ended leaves a tombstone (`tombstone.rs`), so a later Execute is refused
//! instead of opening a second branch that would commit without the first one's statements.
//!
//! Requests for a branch this process does not know (long finished, or before a restart) go
//! straight to the database by gid, which stays correct because COMMIT PREPARED / ROLLBACK
//! PREPARED of a gone gid are checked against how its xid ended (`database::settle_gone`).
//!
//! Generic over the [`Database`] and the [`CoordinatorLink`], so the same code runs on
//! PostgreSQL and gRPC in the binary and in memory in the scenario tests (`scenarios.rs`).

use super::branch::{
    Branch, OnCommit, OnOnePhase, OnPrepare, OnRollback, OnePhaseOutcome, State, Vote,
};
use super::database::PreparedBranch;
use super::database::{Database, Prepared};
use super::error::Error;
use super::gid::Gid;
use super::link::{CoordinatorLink, GrpcCoordinator};
use super::postgres::Postgres;
use super::statement::{self, Datum, Rows, SqlError, Statement};
use super::tombstone::Tombstones;
use crate::proto::marker::MarkerSecret;
use crate::proto::{self, TxnId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A branch in the table: its state machine, the connection holding its open transaction, and
/// a way to cancel the statement running there without waiting for the branch's lock (a
/// deadline or a rollback must not wait behind a statement stuck on a lock).
struct OpenBranch<D: Database> {
    slot: tokio::sync::Mutex<Slot<D>>,
    /// Set only while the slot holds its connection (after that the connection may serve
    /// another branch, whose statements are not ours to cancel). An async lock: held while a
    /// cancel is in flight, so the connection cannot leave the branch under it.
    cancel: tokio::sync::Mutex<Option<D::Cancel>>,
    /// The server process of its connection (0 until it has one): how the lock tables name
    /// the branch (`waits`).
    backend: AtomicI32,
    /// When the statement running now started; `None` between statements. Outside the slot's
    /// lock, which a running statement holds.
    running_since: Mutex<Option<Instant>>,
    /// Why the coordinator rolled it back, if it said (`rollback_because`): the running
    /// statement it cancelled fails with this instead of a bare cancellation.
    aborted: Mutex<Option<AbortCause>>,
    /// When it entered the table: the resolver asks about open branches that old
    /// (`recovery.rs`, `resolve_forgotten`).
    opened: Instant,
}

/// A service's work running on its branch (`with_branch`). Unlike an Execute, which runs in a
/// task of its own, the work runs in the service's handler, which is dropped when its caller
/// cancels: then some of its statements may have run and the rest never will, so the branch
/// is doomed rather than left to commit half of the work.
struct Unfinished<'a> {
    branch: Option<&'a mut Branch>,
    running_since: &'a Mutex<Option<Instant>>,
}

impl<'a> Unfinished<'a> {
    fn start(branch: &'a mut Branch, running_since: &'a Mutex<Option<Instant>>) -> Self {
        *running_since.lock().unwrap() = Some(Instant::now());
        Unfinished {
            branch: Some(branch),
            running_since,
        }
    }

    /// The work returned: the branch, to judge its result.
    fn finish(&mut self) -> &mut Branch {
        *self.running_since.lock().unwrap() = None;
        self.branch.take().expect("finished once")
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(branch) = self.branch.take() {
            *self.running_since.lock().unwrap() = None;
            branch
                .doom("the service's work on this branch was cancelled before it finished".into());
        }
    }
}

/// Why a transaction aborted, as its coordinator tells the branch's Rollback.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AbortCause {
    pub reason: String,
    /// The cause's SQLSTATE, if it has one (40P01: a distributed deadlock's victim).
    pub sqlstate: String,
}

/// What the branch's lock guards.
struct Slot<D: Database> {
    branch: Branch,
    /// The connection holding the branch's open transaction, until it is prepared or ended.
    conn: Option<D::Conn>,
}

impl<D: Database> OpenBranch<D> {
    /// Locks the slot, cancelling the statement running on it if it is busy.
    async fn lock_interrupting(&self, db: &D) -> tokio::sync::MutexGuard<'_, Slot<D>> {
        if let Ok(slot) = self.slot.try_lock() {
            return slot;
        }
        {
            let cancel = self.cancel.lock().await;
            if let Some(cancel) = cancel.as_ref() {
                db.cancel(cancel).await;
            }
        }
        self.slot.lock().await
    }

    /// Gives the branch the connection its transaction runs on, reachable for a cancel and
    /// named by its server process for the lock tables.
    async fn attach(&self, slot: &mut Slot<D>, conn: D::Conn, backend: Option<i32>) {
        *self.cancel.lock().await = Some(D::cancel_handle(&conn));
        self.backend.store(backend.unwrap_or(0), Ordering::Relaxed);
        slot.conn = Some(conn);
    }

    async fn take_conn(&self, slot: &mut Slot<D>) -> Option<D::Conn> {
        *self.cancel.lock().await = None;
        slot.conn.take()
    }
}

/// The branches this process knows.
struct Table<D: Database> {
    open: HashMap<TxnId, Arc<OpenBranch<D>>>,
    ended: Tombstones,
}

/// What the table says of a transaction.
enum Found<D: Database> {
    Open(Arc<OpenBranch<D>>),
    /// Its branch ended here, this way.
    Ended(State),
    /// Never here, or so long ago that only the database remembers.
    Unknown,
}

/// A statement of one of this participant's branches waiting for a lock, and who holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchWait {
    /// The waiting branch's transaction.
    pub waiter: TxnId,
    /// The holder's transaction, when the holder is a branch open here or a prepared one.
    pub holder_txn: Option<TxnId>,
    /// The holder for a person: a branch's txn id and pid, a gid, or another session.
    pub holder: String,
    pub waited_ms: u32,
    /// What is waited for, as pg_locks names it.
    pub lock: String,
}

/// One participant: its database, its coordinator, and its branches.
pub struct Participant<D: Database = Postgres, C: CoordinatorLink = GrpcCoordinator> {
    /// This participant's id, unique among the coordinator's participants.
    pub(super) id: String,
    /// Where the coordinator reaches this participant.
    advertise: String,
    pub(super) db: D,
    pub(super) coordinator: C,
    /// This process, for the coordinator: a restarted participant has lost its open branches.
    instance: String,
    /// Learned from the coordinator's first answer; names our gids.
    coordinator_id: OnceLock<String>,
    branches: Mutex<Table<D>>,
}

/// How long after its deadline an unfinished, unprepared branch is rolled back here. The
/// coordinator aborts at the deadline; the grace keeps us from racing its Prepare.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// How long past its deadline (and the grace) an ended branch is remembered: with clock skew
/// the coordinator may take the transaction for active a while longer.
const TOMBSTONE: Duration = Duration::from_secs(60);

/// How long a one-phase marker is kept when the coordinator never says to forget it (it
/// crashed first; a fence row). The coordinator's own records live as long.
pub const MARKER_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A one-phase branch with no marker is fenced only if its transaction is younger than this:
/// an older one's marker may have been pruned, so "no marker" no longer means "not committed".
const FENCE_HORIZON: Duration = Duration::from_secs(6 * 24 * 3600);

impl<D: Database, C: CoordinatorLink> Participant<D, C> {
    pub fn new(id: String, advertise: String, db: D, coordinator: C) -> Arc<Self> {
        Arc::new(Participant {
            id,
            advertise,
            db,
            coordinator,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            coordinator_id: OnceLock::new(),
            branches: Mutex::new(Table {
                open: HashMap::new(),
                ended: Tombstones::default(),
            }),
        })
    }

    /// Where the coordinator reaches this participant.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    fn find(&self, txn: TxnId) -> Found<D> {
        let table = self.branches.lock().unwrap();
        if let Some(open) = table.open.get(&txn) {
            return Found::Open(open.clone());
        }
        match table.ended.get(txn) {
            Some(state) => Found::Ended(state),
            None => Found::Unknown,
        }
    }

    /// The transactions of the branches open here (not prepared or ended) for at least `age`,
    /// and the coordinator they belong to.
    pub(super) fn open_for(&self, age: Duration) -> (Vec<TxnId>, Option<String>) {
        let table = self.branches.lock().unwrap();
        let txns = table
            .open
            .iter()
            .filter(|(_, open)| open.opened.elapsed() >= age)
            .map(|(txn, _)| *txn)
            .collect();
        (txns, self.coordinator_id.get().cloned())
    }

    /// The branch ended: it leaves the open table and stays as a tombstone.
    fn finish(&self, txn: TxnId, branch: &Branch) {
        let now = crate::process::clock::now_ms();
        let until_ms = branch.deadline_ms + (DEADLINE_GRACE + TOMBSTONE).as_millis() as i64;
        let mut table = self.branches.lock().unwrap();
        table.open.remove(&txn);
        table.ended.insert(txn, branch.state.clone(), until_ms, now);
    }

    /// A tombstone as a branch, for the state machine to answer from.
    fn ended(&self, txn: TxnId, coordinator_id: &str, state: State) -> Result<Branch, Error> {
        Ok(Branch {
            gid: self.gid(txn, coordinator_id)?,
            state,
            deadline_ms: 0,
        })
    }

    /// The gid of a branch the coordinator asks about: it names itself, or it is ours.
    fn gid(&self, txn: TxnId, coordinator_id: &str) -> Result<Gid, Error> {
        let owner = match coordinator_id {
            "" => self.coordinator_id.get().ok_or_else(|| {
                Error::InvalidArgument(
                    "coordinator_id is required: this participant has not met its coordinator yet"
                        .into(),
                )
            })?,
            id => id,
        };
        Ok(Gid::new(owner, txn)?)
    }

    /// Runs `work` on the connection that holds `txn`'s branch here, opening the branch
    /// (enlisted with the coordinator, `BEGIN` sent) on first use: how a service that embeds
    /// the participant runs its own statements in a global transaction, with the database
    /// driver's own API and no gRPC hop per statement (`embedded.rs`). The branch is locked
    /// while `work` runs, as during an Execute; if `work` fails, the branch is doomed (the
    /// transaction can then only abort), exactly as after a failed statement.
    /// `start`: the client chose the txn id itself, so this branch's enlistment may be the one
    /// that creates the transaction.
    pub async fn with_branch<T, E, F>(
        self: &Arc<Self>,
        txn: TxnId,
        start: Option<&proto::Start>,
        work: F,
    ) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c D::Conn) -> futures::future::BoxFuture<'c, Result<T, E>>,
        E: From<Error> + std::fmt::Display,
    {
        let open = self.open_branch(txn, start).await?;
        let mut slot = open.slot.lock().await;
        slot.branch.check_execute().map_err(Error::from)?;
        if slot.conn.is_none() {
            let conn = self.db.conn().await?;
            if let Err(e) = self.db.begin(&conn).await {
                self.db.roll_back_open(conn).await;
                return Err(Error::statement(txn, e).into());
            }
            let backend = self.db.backend_pid(&conn);
            open.attach(&mut slot, conn, backend).await;
        }
        let Slot { branch, conn } = &mut *slot;
        let conn = conn.as_ref().expect("an active branch has a connection");
        let mut running = Unfinished::start(branch, &open.running_since);
        let done = work(conn).await;
        let branch = running.finish();
        if let Err(e) = &done {
            let why = match open.aborted.lock().unwrap().clone() {
                Some(cause) => cause.reason,
                None => e.to_string(),
            };
            branch.doom(why);
        }
        done
    }

    /// Runs one statement in `txn`'s branch, opening the branch on first use.
    pub async fn execute(
        self: &Arc<Self>,
        txn: TxnId,
        sql_text: &str,
        params: &[Datum],
    ) -> Result<Rows, Error> {
        let statement = Statement {
            sql: sql_text.to_string(),
            params: params.to_vec(),
        };
        let mut results = self
            .execute_batch(txn, None, std::slice::from_ref(&statement))
            .await?;
        Ok(results.pop().expect("one result per statement"))
    }

    /// Runs `statements` in order in `txn`'s branch, opening it on first use (enlisted with
    /// `start` if the client chose the id itself). Every statement is checked before the
    /// first runs; the first failure dooms the branch, even a refusal once a statement before
    /// it ran, and stops the batch (docs/PROTOCOL.md §12).
    pub async fn execute_batch(
        self: &Arc<Self>,
        txn: TxnId,
        start: Option<&proto::Start>,
        statements: &[Statement],
    ) -> Result<Vec<Rows>, Error> {
        let count = statements.len();
        if count == 0 {
            return Err(Error::InvalidArgument(
                "no statement: send `sql`, or one or more `statements`".into(),
            ));
        }
        // The position of a statement, in messages about a batch.
        let at = |i: usize, message: String| match count {
            1 => message,
            n => format!("statement {} of {n}: {message}", i + 1),
        };
        for (i, s) in statements.iter().enumerate() {
            statement::check_allowed(&s.sql)
                .and_then(|()| self.db.limits().check_request(&s.sql, s.params.len()))
                .map_err(|e| match Error::statement(txn, e) {
                    Error::InvalidArgument(m) => Error::InvalidArgument(at(i, m)),
                    other => other,
                })?;
        }
        let open = self.open_branch(txn, start).await?;
        let mut slot = open.slot.lock().await;
        slot.branch.check_execute()?;
        let begin = slot.conn.is_none();
        if begin {
            // Nothing has run in the branch yet, so a failure here dooms nothing: the client
            // may retry the statement.
            let conn = self.db.conn().await?;
            let backend = self.db.backend_pid(&conn);
            open.attach(&mut slot, conn, backend).await;
        }
        let mut results = Vec::with_capacity(count);
        for (i, s) in statements.iter().enumerate() {
            if i > 0 {
                crate::failpoint!("participant::between_statements");
            }
            let conn = slot
                .conn
                .as_ref()
                .expect("an active branch has a connection");
            *open.running_since.lock().unwrap() = Some(Instant::now());
            let ran = self
                .db
                .execute(conn, &s.sql, &s.params, begin && i == 0)
                .await;
            *open.running_since.lock().unwrap() = None;
            let err = match ran {
                Ok(resp) => {
                    results.push(resp);
                    continue;
                }
                // Nothing of the branch ran: it stays usable.
                Err(SqlError::Refused(msg)) if i == 0 => {
                    return Err(Error::InvalidArgument(at(i, msg)));
                }
                Err(SqlError::Refused(msg)) => Error::InvalidArgument(at(i, msg)),
                Err(e) => match self.statement_failed(&open, txn, e) {
                    Error::Statement {
                        txn,
                        message,
                        sqlstate,
                    } => Error::Statement {
                        txn,
                        message: at(i, message),
                        sqlstate,
                    },
                    Error::ResourceExhausted(m) => Error::ResourceExhausted(at(i, m)),
                    other => other,
                },
            };
            if let Error::Statement { message, .. }
            | Error::ResourceExhausted(message)
            | Error::InvalidArgument(message) = &err
            {
                slot.branch.doom(message.clone());
            }
            return Err(err);
        }
        Ok(results)
    }

    /// A statement of `open`'s branch failed: its error, or, if the coordinator aborted the
    /// transaction while it ran (its rollback cancelled the statement), that cause.
    fn statement_failed(&self, open: &OpenBranch<D>, txn: TxnId, e: SqlError) -> Error {
        let aborted = open.aborted.lock().unwrap().clone();
        match (aborted, Error::statement(txn, e)) {
            // The cause is the error, with its SQLSTATE if it has one (else the
            // cancellation's, 57014).
            (
                Some(cause),
                Error::Statement {
                    message, sqlstate, ..
                },
            ) => {
                let why = format!(
                    "the coordinator aborted the transaction while this statement ran: {}",
                    cause.reason
                );
                match cause.sqlstate.is_empty() {
                    true => Error::Statement {
                        txn,
                        message: format!("{why} ({message})"),
                        sqlstate,
                    },
                    false => Error::Statement {
                        txn,
                        message: why,
                        sqlstate: Some(cause.sqlstate),
                    },
                }
            }
            (_, err) => err,
        }
    }

    /// The branch of `txn` that statements run in: the open one, or a new one (enlisted);
    /// never one that ended here (FAILED_PRECONDITION: the transaction can only abort).
    async fn open_branch(
        self: &Arc<Self>,
        txn: TxnId,
        start: Option<&proto::Start>,
    ) -> Result<Arc<OpenBranch<D>>, Error> {
        match self.find(txn) {
            Found::Open(open) => Ok(open),
            Found::Ended(state) => Err(self.ended(txn, "", state)?.not_active().into()),
            Found::Unknown => self.open(txn, start).await,
        }
    }

    /// Enlists this participant with the coordinator and makes the branch's entry.
    async fn open(
        self: &Arc<Self>,
        txn: TxnId,
        start: Option<&proto::Start>,
    ) -> Result<Arc<OpenBranch<D>>, Error> {
        let enlisted = self
            .coordinator
            .register(
                txn,
                start,
                &self.id,
                &self.advertise,
                &self.instance,
                self.db.one_phase(),
            )
            .await
            .map_err(Error::Coordinator)?;
        let gid = Gid::new(&enlisted.coordinator_id, txn)?;
        let _ = self.coordinator_id.set(enlisted.coordinator_id);
        let mut table = self.branches.lock().unwrap();
        if let Some(existing) = table.open.get(&txn) {
            // A concurrent Execute got here first.
            return Ok(existing.clone());
        }
        if let Some(state) = table.ended.get(txn) {
            // ... and its branch has ended since: the coordinator took this registration for
            // a repeat, but a fresh branch here would lose the statements that ran before.
            drop(table);
            return Err(self.ended(txn, "", state)?.not_active().into());
        }
        let open = Arc::new(OpenBranch {
            slot: tokio::sync::Mutex::new(Slot {
                branch: Branch::new(gid, enlisted.deadline_ms),
                conn: None,
            }),
            cancel: tokio::sync::Mutex::new(None),
            backend: AtomicI32::new(0),
            running_since: Mutex::new(None),
            aborted: Mutex::new(None),
            opened: Instant::now(),
        });
        table.open.insert(txn, open.clone());
        drop(table);
        // Weak: a pending timer must not keep a stopped participant (and its pool) alive.
        let this = Arc::downgrade(self);
        let until = crate::process::clock::until(enlisted.deadline_ms) + DEADLINE_GRACE;
        tokio::spawn(async move {
            tokio::time::sleep(until).await;
            if let Some(p) = this.upgrade() {
                p.expire(txn).await;
            }
        });
        tracing::debug!(txn_id = %txn, "branch opened");
        Ok(open)
    }

    /// The deadline passed: a branch still open here will never be committed.
    async fn expire(&self, txn: TxnId) {
        let Found::Open(open) = self.find(txn) else {
            return;
        };
        let mut slot = open.lock_interrupting(&self.db).await;
        if slot.branch.is_open() {
            tracing::info!(txn_id = %txn, "branch passed its deadline unprepared: rolling back");
            self.roll_back_open(&open, &mut slot).await;
            self.finish(txn, &slot.branch);
        }
    }

    async fn roll_back_open(&self, open: &OpenBranch<D>, slot: &mut Slot<D>) {
        if let Some(conn) = open.take_conn(slot).await {
            self.db.roll_back_open(conn).await;
        }
        slot.branch.rolled_back();
    }

    pub async fn prepare(&self, txn: TxnId, coordinator_id: &str) -> Result<Vote, Error> {
        let open = match self.find(txn) {
            Found::Open(open) => open,
            Found::Ended(state) => {
                return match self.ended(txn, coordinator_id, state)?.prepare_step() {
                    OnPrepare::Answer(vote) => Ok(vote),
                    step => Err(Error::Internal(format!("an ended branch cannot {step:?}"))),
                };
            }
            Found::Unknown => {
                // Not open here: prepared before a lost reply or a restart, or never opened.
                let gid = self.gid(txn, coordinator_id)?;
                return Ok(match self.db.prepared_xid(&gid).await? {
                    Some(xid) => Vote::Yes { xid },
                    None => Vote::No {
                        reason: format!(
                            "{gid} is not open on participant {}: it never ran a statement here, or it was rolled back",
                            self.id
                        ),
                    },
                });
            }
        };
        let mut slot = open.slot.lock().await;
        let vote = match slot.branch.prepare_step() {
            OnPrepare::Answer(vote) => return Ok(vote),
            OnPrepare::RollBackAndRefuse { reason } => {
                self.roll_back_open(&open, &mut slot).await;
                slot.branch.refused(reason)
            }
            OnPrepare::Prepare => match open.take_conn(&mut slot).await {
                // No statement ever ran here: there is nothing to commit or undo.
                None => slot.branch.read_only(),
                Some(conn) => {
                    let gid = slot.branch.gid.clone();
                    match self.db.prepare(conn, &gid).await {
                        Ok(Prepared::Yes { xid }) => slot.branch.prepared(xid),
                        Ok(Prepared::ReadOnly) => slot.branch.read_only(),
                        Ok(Prepared::No { reason }) => slot.branch.refused(reason),
                        Err(e) => {
                            let xid = self.db.prepared_xid(&gid).await.ok().flatten();
                            slot.branch.prepare_failed(xid, e.to_string())
                        }
                    }
                }
            },
        };
        if slot.branch.is_finished() {
            self.finish(txn, &slot.branch);
        }
        Ok(vote)
    }

    pub async fn commit(&self, txn: TxnId, xid: u64, coordinator_id: &str) -> Result<(), Error> {
        // A tombstone answers a repeat; a Commit of a branch that ended otherwise goes to the
        // database by gid, whose check raises the ATOMICITY ALARM it deserves.
        let open = match self.find(txn) {
            Found::Open(open) => open,
            Found::Ended(state)
                if matches!(
                    self.ended(txn, coordinator_id, state.clone())?
                        .commit_step(),
                    Ok(OnCommit::AlreadyDone)
                ) =>
            {
                return Ok(());
            }
            Found::Ended(_) | Found::Unknown => {
                let gid = self.gid(txn, coordinator_id)?;
                return self.db.finish_prepared(&gid, xid, true).await;
            }
        };
        let mut slot = open.slot.lock().await;
        match slot.branch.commit_step()? {
            OnCommit::AlreadyDone => Ok(()),
            OnCommit::CommitPrepared { xid: ours } => {
                let gid = slot.branch.gid.clone();
                self.db
                    .finish_prepared(&gid, if ours != 0 { ours } else { xid }, true)
                    .await?;
                slot.branch.committed();
                self.finish(txn, &slot.branch);
                Ok(())
            }
        }
    }

    pub async fn rollback(&self, txn: TxnId, xid: u64, coordinator_id: &str) -> Result<(), Error> {
        self.rollback_because(txn, xid, coordinator_id, None).await
    }

    /// Rollback, with the abort's cause when the coordinator tells it: a statement of the
    /// branch still running is cancelled and fails with that cause.
    pub async fn rollback_because(
        &self,
        txn: TxnId,
        xid: u64,
        coordinator_id: &str,
        cause: Option<AbortCause>,
    ) -> Result<(), Error> {
        // As for Commit: only a repeat is answered from the tombstone.
        let open = match self.find(txn) {
            Found::Open(open) => open,
            Found::Ended(state)
                if matches!(
                    self.ended(txn, coordinator_id, state.clone())?
                        .rollback_step(),
                    Ok(OnRollback::AlreadyDone)
                ) =>
            {
                return Ok(());
            }
            Found::Ended(_) | Found::Unknown => {
                let gid = self.gid(txn, coordinator_id)?;
                return self.db.finish_prepared(&gid, xid, false).await;
            }
        };
        if cause.is_some() {
            *open.aborted.lock().unwrap() = cause;
        }
        let mut slot = open.lock_interrupting(&self.db).await;
        match slot.branch.rollback_step()? {
            OnRollback::AlreadyDone => {}
            OnRollback::RollBackOpen => self.roll_back_open(&open, &mut slot).await,
            OnRollback::RollBackPrepared { xid: ours } => {
                let gid = slot.branch.gid.clone();
                self.db
                    .finish_prepared(&gid, if ours != 0 { ours } else { xid }, false)
                    .await?;
                slot.branch.rolled_back();
            }
        }
        self.finish(txn, &slot.branch);
        Ok(())
    }

    /// The waits of this participant's branches for locks, at least `min_wait` old, with who
    /// holds each lock: a branch (by its txn), a prepared transaction, or another session.
    /// Without a statement running that long, PostgreSQL is not asked at all: an idle or
    /// quick participant costs the deadlock detector nothing but the call.
    pub async fn waits(&self, min_wait: Duration) -> Result<Vec<BranchWait>, Error> {
        let (long_running, by_pid) = {
            let table = self.branches.lock().unwrap();
            let mut long_running = Vec::new();
            let mut by_pid = HashMap::new();
            for (txn, open) in &table.open {
                let pid = open.backend.load(Ordering::Relaxed);
                if pid == 0 {
                    continue;
                }
                by_pid.insert(pid, *txn);
                let since = *open.running_since.lock().unwrap();
                if since.is_some_and(|t| t.elapsed() >= min_wait) {
                    long_running.push(pid);
                }
            }
            (long_running, by_pid)
        };
        if long_running.is_empty() {
            return Ok(Vec::new());
        }
        let waits = self.db.lock_waits(&long_running, min_wait).await?;
        Ok(waits
            .into_iter()
            .filter_map(|w| {
                let waiter = by_pid.get(&w.waiter)?;
                let holder_txn = match w.holder {
                    0 => w.holder_gid.as_deref().and_then(Gid::parse).map(|g| g.txn),
                    pid => by_pid.get(&pid).copied(),
                };
                Some(BranchWait {
                    waiter: *waiter,
                    holder_txn,
                    holder: match (holder_txn, w.holder) {
                        (Some(t), pid) if pid != 0 => format!("transaction {t} (pid {pid})"),
                        _ => w.holder_text,
                    },
                    waited_ms: w.waited_ms,
                    lock: w.lock,
                })
            })
            .collect())
    }

    /// One saga step (docs/SAGAS.md §4): no branch and no coordinator registration, a local
    /// transaction of its own with the step's barrier row.
    pub async fn saga_step(
        &self,
        call: &super::barrier::StepCall,
    ) -> Result<super::barrier::StepAnswer, Error> {
        self.db.saga_step(call).await
    }

    /// Commits the transaction's lone branch in one phase: its COMMIT is the transaction's
    /// outcome. A repeat is answered from the branch's state, or from the database when the
    /// branch is no longer here (docs/PROTOCOL.md, "One-phase commit of a lone branch").
    /// `secret` addresses the transaction's marker; `forget`: the secrets of earlier one-phase
    /// transactions whose markers the coordinator no longer needs.
    pub async fn commit_one_phase(
        &self,
        txn: TxnId,
        coordinator_id: &str,
        secret: &MarkerSecret,
        forget: &[MarkerSecret],
    ) -> Result<OnePhaseOutcome, Error> {
        let open = match self.find(txn) {
            Found::Open(open) => open,
            Found::Ended(state) => {
                return match self.ended(txn, coordinator_id, state)?.one_phase_step()? {
                    OnOnePhase::Answer(outcome) => Ok(outcome),
                    step => Err(Error::Internal(format!("an ended branch cannot {step:?}"))),
                };
            }
            Found::Unknown => {
                let gid = self.gid(txn, coordinator_id)?;
                return self.one_phase_by_marker(txn, &gid, secret).await;
            }
        };
        let mut slot = open.slot.lock().await;
        let gid = slot.branch.gid.clone();
        let outcome = match slot.branch.one_phase_step()? {
            OnOnePhase::Answer(outcome) => return Ok(outcome),
            OnOnePhase::AskDatabase => {
                let outcome = self.one_phase_by_marker(txn, &gid, secret).await?;
                slot.branch.one_phase_ended(outcome)
            }
            OnOnePhase::RollBackAndRefuse { reason } => {
                self.roll_back_open(&open, &mut slot).await;
                slot.branch
                    .one_phase_ended(OnePhaseOutcome::Aborted { reason })
            }
            OnOnePhase::Commit => match open.take_conn(&mut slot).await {
                // No statement ever ran here: nothing to commit, nothing to mark.
                None => slot
                    .branch
                    .one_phase_ended(OnePhaseOutcome::Committed { read_only: true }),
                Some(conn) => match self.db.commit_one_phase(conn, &gid, secret, forget).await {
                    Ok(outcome) => slot.branch.one_phase_ended(outcome),
                    Err(e) => {
                        tracing::warn!(%gid, error = %e, "one-phase COMMIT got no answer; asking the database");
                        slot.branch.one_phase_in_doubt();
                        let outcome = self.one_phase_by_marker(txn, &gid, secret).await?;
                        slot.branch.one_phase_ended(outcome)
                    }
                },
            },
        };
        if slot.branch.is_finished() {
            self.finish(txn, &slot.branch);
        }
        Ok(outcome)
    }

    /// How a one-phase branch that is not open here ended, by its marker; with none, a fence
    /// makes "not committed" final, unless the transaction is too old for "no marker" to mean
    /// that (its marker may have been pruned).
    async fn one_phase_by_marker(
        &self,
        txn: TxnId,
        gid: &Gid,
        secret: &MarkerSecret,
    ) -> Result<OnePhaseOutcome, Error> {
        let too_old = txn.created_ms().is_none_or(|created| {
            crate::process::clock::now_ms() - created > FENCE_HORIZON.as_millis() as i64
        });
        let committed = match self.db.one_phase_outcome(gid, secret, false).await? {
            Some(committed) => committed,
            None if too_old => {
                return Err(Error::FailedPrecondition(format!(
                    "{gid} has no one-phase marker here, and its transaction is too old to tell whether the marker was pruned: check the data, then resolve the transaction by hand"
                )));
            }
            None => self
                .db
                .one_phase_outcome(gid, secret, true)
                .await?
                .ok_or_else(|| {
                    Error::Internal(format!("{gid} has no marker even after its fence"))
                })?,
        };
        Ok(if committed {
            OnePhaseOutcome::Committed { read_only: false }
        } else {
            OnePhaseOutcome::Aborted {
                reason: format!(
                    "{gid} did not commit on participant {}: it never ran a statement here, was rolled back, or was lost in a restart",
                    self.id
                ),
            }
        })
    }

    /// Our prepared branches in this database (of `coordinator_id`, or all).
    pub async fn recover(&self, coordinator_id: &str) -> Result<Vec<PreparedBranch>, Error> {
        let prepared = self.db.prepared_older_than(Duration::ZERO).await?;
        Ok(prepared
            .into_iter()
            .filter(|p| coordinator_id.is_empty() || p.gid.coordinator_id == coordinator_id)
            .collect())
    }
}
