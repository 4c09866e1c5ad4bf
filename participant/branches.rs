//! The participant's table of open branches, and the protocol steps on them.
//!
//! A branch appears on a transaction's first Execute here (after the coordinator accepts its
//! registration) and leaves the table once finished. Each branch sits behind an async mutex,
//! held across its PostgreSQL work, so a Prepare waits for a running statement and a repeated
//! Commit waits for the first. Requests for a branch that is no longer in the table (finished,
//! or this process restarted) go straight to PostgreSQL by gid, which stays correct because
//! `COMMIT PREPARED` / `ROLLBACK PREPARED` outcomes are checked against `pg_xact_status`.

use super::branch::{Branch, CommitStep, PrepareStep, RollbackStep, State, Vote};
use super::error::Error;
use super::gid::Gid;
use super::postgres::{Database, Prepared};
use super::sql;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::{self, RegisterBranchRequest, TxnId};
use deadpool_postgres::Object;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tonic::transport::Channel;

struct Slot {
    branch: Branch,
    /// The connection holding the branch's open transaction, until it is prepared or ended.
    conn: Option<Object>,
}

/// A branch in the table. `cancel` reaches the statement running on the branch's connection
/// without its lock: a deadline or a rollback must not wait behind a statement stuck on a lock.
/// It is set only while the slot holds its connection (after that the connection may serve
/// another branch, whose statements are not ours to cancel).
struct Entry {
    slot: tokio::sync::Mutex<Slot>,
    /// An async lock: held while a cancel is in flight, so the connection cannot leave the
    /// branch (and start serving another) under a cancel meant for this one.
    cancel: tokio::sync::Mutex<Option<tokio_postgres::CancelToken>>,
}

impl Entry {
    /// Locks the slot, cancelling the statement running on it if it is busy.
    async fn lock_interrupting(&self) -> tokio::sync::MutexGuard<'_, Slot> {
        if let Ok(slot) = self.slot.try_lock() {
            return slot;
        }
        {
            let token = self.cancel.lock().await;
            if let Some(token) = token.as_ref()
                && let Err(e) = token.cancel_query(tokio_postgres::NoTls).await
            {
                tracing::warn!(error = %e, "could not cancel a running statement");
            }
        }
        self.slot.lock().await
    }

    async fn take_conn(&self, slot: &mut Slot) -> Option<Object> {
        *self.cancel.lock().await = None;
        slot.conn.take()
    }
}

type SlotRef = Arc<Entry>;

pub struct Participant {
    pub(super) id: String,
    advertise: String,
    pub(super) db: Database,
    coordinator: CoordinatorClient<Channel>,
    /// This process, for the coordinator: a restarted participant has lost its open branches.
    instance: String,
    /// Learned from the coordinator's first answer; names our gids.
    coordinator_id: OnceLock<String>,
    branches: Mutex<HashMap<TxnId, SlotRef>>,
}

/// How long after its deadline an unfinished, unprepared branch is rolled back here. The
/// coordinator aborts at the deadline; the grace keeps us from racing its Prepare.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// How long an expired branch is remembered as rolled back.
const TOMBSTONE: Duration = Duration::from_secs(60);

impl Participant {
    pub fn new(
        id: String,
        advertise: String,
        db: Database,
        coordinator: CoordinatorClient<Channel>,
    ) -> Arc<Self> {
        Arc::new(Participant {
            id,
            advertise,
            db,
            coordinator,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            coordinator_id: OnceLock::new(),
            branches: Mutex::new(HashMap::new()),
        })
    }

    fn slot(&self, txn: TxnId) -> Option<SlotRef> {
        self.branches.lock().unwrap().get(&txn).cloned()
    }

    fn forget(&self, txn: TxnId) {
        self.branches.lock().unwrap().remove(&txn);
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

    pub async fn execute(
        self: &Arc<Self>,
        txn: TxnId,
        sql_text: &str,
        params: &[proto::Value],
    ) -> Result<proto::ExecuteResponse, Error> {
        sql::refuse_transaction_control(sql_text).map_err(|e| Error::statement(txn, e))?;
        let slot = match self.slot(txn) {
            Some(slot) => slot,
            None => self.open(txn).await?,
        };
        let entry = slot;
        let mut slot = entry.slot.lock().await;
        slot.branch.check_execute()?;
        let begin = slot.conn.is_none();
        if begin {
            // Nothing has run in the branch yet, so a failure here dooms nothing: the client
            // may retry the statement.
            let conn = self.db.conn().await?;
            *entry.cancel.lock().await = Some(conn.cancel_token());
            slot.conn = Some(conn);
        }
        let conn = slot
            .conn
            .as_ref()
            .expect("an active branch has a connection");
        match sql::execute(conn, sql_text, params, begin).await {
            Ok(resp) => Ok(resp),
            Err(sql::SqlError::Refused(msg)) => Err(Error::InvalidArgument(msg)),
            Err(sql::SqlError::Postgres(e)) => {
                let err = Error::statement(txn, sql::SqlError::Postgres(e));
                if let Error::Statement { message, .. } = &err {
                    slot.branch.doom(message.clone());
                }
                Err(err)
            }
        }
    }

    /// Enlists this participant with the coordinator and makes the branch's slot.
    async fn open(self: &Arc<Self>, txn: TxnId) -> Result<SlotRef, Error> {
        let resp = self
            .coordinator
            .clone()
            .register_branch({
                let mut req = tonic::Request::new(RegisterBranchRequest {
                    txn_id: txn.to_string(),
                    participant_id: self.id.clone(),
                    endpoint: self.advertise.clone(),
                    instance_id: self.instance.clone(),
                });
                if let Ok(v) = txn.traceparent().parse() {
                    req.metadata_mut().insert("traceparent", v);
                }
                req
            })
            .await
            .map_err(Error::Coordinator)?
            .into_inner();
        let gid = Gid::new(&resp.coordinator_id, txn)?;
        let _ = self.coordinator_id.set(resp.coordinator_id);
        let mut table = self.branches.lock().unwrap();
        if let Some(existing) = table.get(&txn) {
            // A concurrent Execute got here first.
            return Ok(existing.clone());
        }
        let slot = Arc::new(Entry {
            slot: tokio::sync::Mutex::new(Slot {
                branch: Branch::new(gid, resp.deadline_unix_ms),
                conn: None,
            }),
            cancel: tokio::sync::Mutex::new(None),
        });
        table.insert(txn, slot.clone());
        drop(table);
        // Weak: a pending timer must not keep a stopped participant (and its pool) alive.
        let this = Arc::downgrade(self);
        let until = crate::process::clock::until(resp.deadline_unix_ms) + DEADLINE_GRACE;
        tokio::spawn(async move {
            tokio::time::sleep(until).await;
            let expired = match this.upgrade() {
                Some(p) => p.expire(txn).await,
                None => return,
            };
            if expired {
                tokio::time::sleep(TOMBSTONE).await;
                if let Some(p) = this.upgrade() {
                    p.forget(txn);
                }
            }
        });
        tracing::debug!(txn_id = %txn, "branch opened");
        Ok(slot)
    }

    /// The deadline passed: a branch still active here will never be committed.
    async fn expire(&self, txn: TxnId) -> bool {
        let Some(entry) = self.slot(txn) else {
            return false;
        };
        let mut slot = entry.lock_interrupting().await;
        if matches!(slot.branch.state, State::Active | State::Doomed { .. }) {
            tracing::info!(txn_id = %txn, "branch passed its deadline unprepared: rolling back");
            self.roll_back_open(&entry, &mut slot).await;
            // Kept a while as a tombstone: with clock skew the coordinator may still think the
            // transaction active, and a late Execute must hear "rolled back", not start a fresh
            // PostgreSQL transaction that would silently drop the statements before it.
            return true;
        }
        false
    }

    async fn roll_back_open(&self, entry: &Entry, slot: &mut Slot) {
        if let Some(conn) = entry.take_conn(slot).await {
            match conn.batch_execute("ROLLBACK").await {
                Ok(()) => Database::release(conn),
                // Closing the connection rolls the transaction back all the same.
                Err(_) => drop(Object::take(conn)),
            }
        }
        slot.branch.state = State::RolledBack;
    }

    pub async fn prepare(&self, txn: TxnId, coordinator_id: &str) -> Result<Vote, Error> {
        let Some(slot) = self.slot(txn) else {
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
        };
        let entry = slot;
        let mut slot = entry.slot.lock().await;
        match slot.branch.prepare_step() {
            PrepareStep::Answer(vote) => Ok(vote),
            PrepareStep::RollBackAndRefuse { reason } => {
                self.roll_back_open(&entry, &mut slot).await;
                self.forget(txn);
                Ok(Vote::No { reason })
            }
            PrepareStep::Prepare => {
                let Some(conn) = entry.take_conn(&mut slot).await else {
                    // No statement ever ran here: there is nothing to commit or undo.
                    slot.branch.state = State::ReadOnly;
                    self.forget(txn);
                    return Ok(Vote::ReadOnly);
                };
                let gid = slot.branch.gid.clone();
                let prepared = self.db.prepare(conn, &gid).await.map(|(p, conn)| {
                    Database::release(conn);
                    p
                });
                match prepared {
                    Ok(Prepared::Yes { xid }) => {
                        slot.branch.state = State::Prepared { xid };
                        Ok(Vote::Yes { xid })
                    }
                    Ok(Prepared::ReadOnly) => {
                        slot.branch.state = State::ReadOnly;
                        self.forget(txn);
                        Ok(Vote::ReadOnly)
                    }
                    Ok(Prepared::No { reason }) => {
                        slot.branch.state = State::RolledBack;
                        self.forget(txn);
                        Ok(Vote::No { reason })
                    }
                    Err(e) => {
                        // The connection broke mid-PREPARE: it may or may not be prepared.
                        // Vote no; the rollback that follows settles it either way.
                        let xid = self.db.prepared_xid(&gid).await.ok().flatten().unwrap_or(0);
                        slot.branch.state = State::Prepared { xid };
                        Ok(Vote::No {
                            reason: format!("PREPARE TRANSACTION did not complete: {e}"),
                        })
                    }
                }
            }
        }
    }

    pub async fn commit(&self, txn: TxnId, xid: u64, coordinator_id: &str) -> Result<(), Error> {
        let Some(slot) = self.slot(txn) else {
            return self
                .db
                .commit_prepared(&self.gid(txn, coordinator_id)?, xid)
                .await;
        };
        let mut slot = slot.slot.lock().await;
        match slot.branch.commit_step()? {
            CommitStep::AlreadyDone => Ok(()),
            CommitStep::CommitPrepared { xid: ours } => {
                let gid = slot.branch.gid.clone();
                self.db
                    .commit_prepared(&gid, if ours != 0 { ours } else { xid })
                    .await?;
                slot.branch.state = State::Committed;
                self.forget(txn);
                Ok(())
            }
        }
    }

    pub async fn rollback(&self, txn: TxnId, xid: u64, coordinator_id: &str) -> Result<(), Error> {
        let Some(slot) = self.slot(txn) else {
            return self
                .db
                .rollback_prepared(&self.gid(txn, coordinator_id)?, xid)
                .await;
        };
        let entry = slot;
        let mut slot = entry.lock_interrupting().await;
        match slot.branch.rollback_step()? {
            RollbackStep::AlreadyDone => {}
            RollbackStep::RollBackOpen => self.roll_back_open(&entry, &mut slot).await,
            RollbackStep::RollBackPrepared { xid: ours } => {
                let gid = slot.branch.gid.clone();
                self.db
                    .rollback_prepared(&gid, if ours != 0 { ours } else { xid })
                    .await?;
                slot.branch.state = State::RolledBack;
            }
        }
        self.forget(txn);
        Ok(())
    }

    /// The txn ids of our prepared branches in this database (of `coordinator_id`, or all).
    pub async fn recover(&self, coordinator_id: &str) -> Result<Vec<proto::PreparedBranch>, Error> {
        let prepared = self.db.prepared_older_than(Duration::ZERO).await?;
        Ok(prepared
            .into_iter()
            .filter(|(g, _, _)| coordinator_id.is_empty() || g.coordinator_id == coordinator_id)
            .map(|(gid, age_s, xid)| proto::PreparedBranch {
                txn_id: gid.txn.to_string(),
                coordinator_id: gid.coordinator_id.clone(),
                gid: gid.to_string(),
                xid,
                age_ms: (age_s * 1000.0) as i64,
            })
            .collect())
    }
}
