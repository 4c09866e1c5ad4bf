//! The decision log: the coordinator's only durable state.
//!
//! One record per transaction, keyed by txn id, holding the whole [`Txn`] (state, branches and
//! their xids). The protocol needs exactly one forced write: the commit decision, which must be
//! on disk before the first COMMIT PREPARED is sent and before anyone hears "committed". Every
//! other write (branch registered, aborted, finished) is a hint for recovery and for
//! `GetTransaction`; losing it is safe under presumed abort, because a transaction without a
//! commit record is aborted.
//!
//! The protocol core is generic over [`Log`], one backend a file: [`SledLog`] on the
//! coordinator's disk (`sled_log.rs`, group commit in `flusher.rs`), the log on etcd for
//! replicas (`etcd_log.rs`, docs/HA.md), and `MemLog` in tests (`mem_log.rs`; with the
//! `testkit` feature), where `crash()` keeps only what was synced, as a power cut would.

#[cfg(feature = "etcd")]
pub mod etcd_log;
mod flusher;
#[cfg(any(test, feature = "testkit"))]
mod mem_log;
mod sled_log;

#[cfg(feature = "etcd")]
pub use etcd_log::{EtcdLog, EtcdTarget, Fence};
#[cfg(any(test, feature = "testkit"))]
pub use mem_log::MemLog;
pub use sled_log::SledLog;

use super::marker_key::MarkerKey;
use super::saga::Saga;
use super::txn::Txn;
use crate::proto::TxnId;
use std::future::Future;

/// The on-disk format; a data dir written by another version is refused, never reinterpreted.
const FORMAT_VERSION: &str = "twopc-log-1";

/// Why the log could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("decision log I/O failed: {0}")]
    Sled(#[from] sled::Error),
    #[error("decision log record for {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error(
        "data dir {dir} holds format {found:?}, this build reads {FORMAT_VERSION:?}; refusing to start rather than lose its decisions"
    )]
    IncompatibleVersion { dir: String, found: String },
    #[error(
        "data dir {dir} belongs to coordinator {existing:?}, not {requested:?}; the id cannot change once set"
    )]
    IdMismatch {
        dir: String,
        existing: String,
        requested: String,
    },
    #[error(transparent)]
    InvalidId(#[from] crate::proto::names::InvalidName),
    #[error(
        "cannot open the decision log in {dir}: {reason}. Refusing to start: starting without it would forget durable commits. Restore the directory from backup, or fix its permissions"
    )]
    Unreadable { dir: String, reason: String },
    /// The log on etcd (`--log etcd`): unreachable, refused, or this replica no longer leads.
    #[error("decision log on etcd: {0}")]
    Etcd(String),
    #[error(
        "{dir} is not empty but holds no twopc decision log; refusing to start there. Point --data-dir at the coordinator's own directory, or at an empty one for a new coordinator"
    )]
    NotALog { dir: String },
}

/// The coordinator's durable state, as the protocol needs it: one record per transaction, and
/// the registry of participants ever enlisted. Writes are cheap and not durable until `sync`,
/// which is the protocol's one forced write.
pub trait Log: Send + Sync + 'static {
    /// Writes (or overwrites) the transaction's record. Durable only after `sync`.
    fn put(&self, txn: &Txn) -> Result<(), LogError>;

    /// Returns once every `put` that returned before this call is durable.
    fn sync(&self) -> impl Future<Output = Result<(), LogError>> + Send;

    fn get(&self, id: TxnId) -> Result<Option<Txn>, LogError>;

    /// Records newest first, those `keep` accepts, at most `limit`.
    fn newest(&self, limit: usize, keep: &dyn Fn(&Txn) -> bool) -> Result<Vec<Txn>, LogError>;

    /// Every record not in a final state: what recovery must finish.
    fn unfinished(&self) -> Result<Vec<Txn>, LogError> {
        self.newest(usize::MAX, &|t| !t.state.is_final())
    }

    /// Writes (or overwrites) a saga's record (docs/SAGAS.md §3). Durable only after `sync`.
    fn put_saga(&self, saga: &Saga) -> Result<(), LogError>;

    fn get_saga(&self, id: &str) -> Result<Option<Saga>, LogError>;

    /// Every saga not in a final state: what recovery must resume.
    fn unfinished_sagas(&self) -> Result<Vec<Saga>, LogError> {
        Ok(unfinished(self.sagas()?.iter()))
    }
    /// Every saga the log keeps (ListSagas).
    fn sagas(&self) -> Result<Vec<Saga>, LogError>;
    /// Removes a final saga's record (retention, once its barrier rows are forgotten).
    fn delete_saga(&self, id: &str) -> Result<(), LogError>;

    /// Remembers a participant, so recovery can ask it for branches nobody else knows of.
    /// Returns true if it is new (or moved), in which case the caller must `sync`.
    fn enlist(&self, participant_id: &str, endpoint: &str) -> Result<bool, LogError>;

    /// Every participant ever enlisted: (id, endpoint).
    fn participants(&self) -> Result<Vec<(String, String)>, LogError>;

    /// Deletes the records of transactions that finished before `before_ms`, and returns how
    /// many. Never an unfinished one (recovery needs it), nor one an operator forced (a branch
    /// of it may still be prepared, and without the record it would be presumed aborted).
    fn prune(&self, before_ms: i64) -> Result<usize, LogError>;

    /// The key one-phase markers' secrets are derived from, created with the log and the same
    /// for as long as it lives (`marker_key.rs`).
    fn marker_key(&self) -> MarkerKey;

    /// This log's epoch: larger than at any earlier start or term of the log, durable before
    /// the coordinator serves, fixed while it runs (`epoch.rs`).
    fn epoch(&self) -> u64;
}

/// `Log::newest` of a log held in memory, keyed (and so ordered) by txn id.
#[cfg(any(test, feature = "testkit", feature = "etcd"))]
fn newest_in(
    txns: &std::collections::BTreeMap<TxnId, Txn>,
    limit: usize,
    keep: &dyn Fn(&Txn) -> bool,
) -> Vec<Txn> {
    txns.values()
        .rev()
        .filter(|t| keep(t))
        .take(limit)
        .cloned()
        .collect()
}

/// The sagas of `sagas` that are not final, for `Log::unfinished_sagas`.
fn unfinished<'a>(sagas: impl Iterator<Item = &'a Saga>) -> Vec<Saga> {
    sagas.filter(|s| !s.state.is_final()).cloned().collect()
}

/// Whether a record may go: see `Log::prune`.
fn prunable(txn: &Txn, before_ms: i64) -> bool {
    txn.state.is_final() && !txn.forced && txn.finished_ms < before_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::txn::State;
    use std::sync::Arc;

    fn txn() -> Txn {
        Txn::begin(TxnId::generate(), "label".into(), 1, 2)
    }

    #[tokio::test]
    async fn a_synced_record_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let t = txn();
        {
            let (log, id) = SledLog::open(dir.path(), Some("coord-a")).unwrap();
            assert_eq!(id, "coord-a");
            log.put(&t).unwrap();
            log.sync().await.unwrap();
        }
        let (log, id) = SledLog::open(dir.path(), None).unwrap();
        assert_eq!(id, "coord-a", "the id is stable across restarts");
        assert_eq!(log.get(t.id).unwrap(), Some(t));
    }

    /// A saga's record is kept as a transaction's is (docs/SAGAS.md §3): what was synced
    /// survives a restart, and a final saga is no longer unfinished.
    #[tokio::test]
    async fn a_synced_saga_survives_reopening_and_a_final_one_is_not_resumed() {
        use crate::coordinator::saga::{SagaState, tests::saga};
        let dir = tempfile::tempdir().unwrap();
        let (running, mut done) = (saga("running"), saga("done"));
        done.state = SagaState::Completed;
        {
            let (log, _) = SledLog::open(dir.path(), Some("coord-a")).unwrap();
            log.put_saga(&running).unwrap();
            log.put_saga(&done).unwrap();
            log.sync().await.unwrap();
        }
        let (log, _) = SledLog::open(dir.path(), None).unwrap();
        assert_eq!(log.get_saga("running").unwrap(), Some(running.clone()));
        assert_eq!(log.get_saga("done").unwrap(), Some(done));
        assert_eq!(log.unfinished_sagas().unwrap(), vec![running]);
        assert_eq!(log.get_saga("never").unwrap(), None);
    }

    #[tokio::test]
    async fn a_saga_written_but_not_synced_is_lost_in_a_crash() {
        use crate::coordinator::saga::tests::saga;
        let log = MemLog::default();
        log.put_saga(&saga("synced")).unwrap();
        log.sync().await.unwrap();
        log.put_saga(&saga("unsynced")).unwrap();
        let after = log.crash();
        assert!(after.get_saga("synced").unwrap().is_some());
        assert_eq!(after.get_saga("unsynced").unwrap(), None);
    }

    #[tokio::test]
    async fn concurrent_syncs_share_flushes_and_all_return() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = SledLog::open(dir.path(), None).unwrap();
        let log = Arc::new(log);
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let log = log.clone();
                tokio::spawn(async move {
                    log.put(&txn()).unwrap();
                    log.sync().await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(log.newest(100, &|_| true).unwrap().len(), 64);
    }

    /// Tickets can reach the flusher out of order when callers on several threads race; the
    /// last caller of a burst must still return (it once waited for a flush that never came,
    /// because a lower ticket's flush had moved the flushed mark back below its own).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_sync_of_every_burst_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = SledLog::open(dir.path(), None).unwrap();
        let log = Arc::new(log);
        for _ in 0..200 {
            let burst = (0..32).map(|_| {
                let log = log.clone();
                tokio::spawn(async move {
                    log.put(&txn()).unwrap();
                    log.sync().await.unwrap();
                })
            });
            // Generous: a burst takes milliseconds; without the fix one hangs for ever.
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                futures::future::join_all(burst),
            )
            .await
            .expect("a sync waited for a flush that never came");
        }
    }

    #[test]
    fn every_open_is_a_new_larger_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let epochs: Vec<u64> = (0..3)
            .map(|_| SledLog::open(dir.path(), None).unwrap().0.epoch())
            .collect();
        assert_eq!(epochs, [1, 2, 3]);
        let log = MemLog::default();
        assert_eq!(
            log.crash().epoch(),
            log.epoch() + 1,
            "a restart is a new epoch"
        );
    }

    #[test]
    fn refuses_another_id_or_format() {
        let dir = tempfile::tempdir().unwrap();
        drop(SledLog::open(dir.path(), Some("a")).unwrap());
        assert!(matches!(
            SledLog::open(dir.path(), Some("b")),
            Err(LogError::IdMismatch { .. })
        ));
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert("format", "twopc-log-0")
                .unwrap();
            db.flush().unwrap();
        }
        assert!(matches!(
            SledLog::open(dir.path(), None),
            Err(LogError::IncompatibleVersion { .. })
        ));
        assert!(matches!(
            SledLog::open(tempfile::tempdir().unwrap().path(), Some("x'; --")),
            Err(LogError::InvalidId(..))
        ));
    }

    #[test]
    fn refuses_a_damaged_or_foreign_directory_instead_of_starting_empty() {
        let foreign = tempfile::tempdir().unwrap();
        std::fs::write(foreign.path().join("notes.txt"), "not a log").unwrap();
        assert!(matches!(
            SledLog::open(foreign.path(), None),
            Err(LogError::NotALog { .. })
        ));

        let damaged = tempfile::tempdir().unwrap();
        {
            let (log, _) = SledLog::open(damaged.path(), Some("a")).unwrap();
            log.put(&txn()).unwrap();
        }
        for entry in std::fs::read_dir(damaged.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::write(&path, vec![0xA5u8; 4096]).unwrap();
            }
        }
        let reopened = SledLog::open(damaged.path(), None);
        assert!(
            reopened.is_err(),
            "a damaged log must not open as an empty one"
        );
    }

    #[test]
    fn a_second_coordinator_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_running, _) = SledLog::open(dir.path(), None).unwrap();

        let second = SledLog::open(dir.path(), None);

        assert!(
            matches!(&second, Err(LogError::Unreadable { reason, .. }) if reason.contains("holds its lock")),
            "{:?}",
            second.err()
        );
    }

    #[test]
    fn pruning_keeps_what_recovery_or_a_returning_branch_could_need() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = SledLog::open(dir.path(), None).unwrap();
        let finished = |state: State, finished_ms: i64, forced: bool| {
            let mut t = Txn::begin(TxnId::generate(), String::new(), 1, 2);
            t.state = state;
            t.finished_ms = finished_ms;
            t.forced = forced;
            log.put(&t).unwrap();
            t.id
        };
        let old_committed = finished(State::Committed, 10, false);
        let old_aborted = finished(State::Aborted, 10, false);
        let recent = finished(State::Committed, 500, false);
        let forced = finished(State::Committed, 10, true);
        let unfinished = finished(State::Committing, 0, false);

        assert_eq!(log.prune(100).unwrap(), 2);

        assert!(log.get(old_committed).unwrap().is_none());
        assert!(log.get(old_aborted).unwrap().is_none());
        for kept in [recent, forced, unfinished] {
            assert!(log.get(kept).unwrap().is_some());
        }
    }

    #[test]
    fn newest_lists_in_reverse_creation_order() {
        let log = MemLog::default();
        let (a, b) = (txn(), txn());
        log.put(&a).unwrap();
        log.put(&b).unwrap();
        let ids: Vec<_> = log
            .newest(10, &|_| true)
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, vec![b.id, a.id]);
    }

    #[tokio::test]
    async fn mem_log_crash_keeps_only_synced_records() {
        let log = MemLog::default();
        let (a, b) = (txn(), txn());
        log.put(&a).unwrap();
        log.sync().await.unwrap();
        log.put(&b).unwrap();
        let after = log.crash();
        assert!(after.get(a.id).unwrap().is_some());
        assert!(after.get(b.id).unwrap().is_none());
    }
}
