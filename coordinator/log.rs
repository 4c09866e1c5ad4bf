//! The decision log: the coordinator's only durable state.
//!
//! One record per transaction, keyed by txn id, holding the whole [`Txn`] (state, branches and
//! their xids). The protocol needs exactly one forced write: the commit decision, which must be
//! on disk before the first COMMIT PREPARED is sent and before anyone hears "committed". Every
//! other write (branch registered, aborted, finished) is a hint for recovery and for
//! `GetTransaction`; losing it is safe under presumed abort, because a transaction without a
//! commit record is aborted.
//!
//! The protocol core is generic over [`Log`]: [`SledLog`] in the binary, [`MemLog`] in tests,
//! where `crash()` keeps only what was synced, as a power cut would.

use super::flusher::Flusher;
use super::marker_key::MarkerKey;
use super::txn::Txn;
use crate::proto::TxnId;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};

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

/// sled's "could not acquire lock" (it wraps the OS's WouldBlock in an error of its own kind).
fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock
        || io.to_string().contains("could not acquire lock"))
}

/// `Log::newest` of a log held in memory, keyed (and so ordered) by txn id.
pub(super) fn newest_in(
    txns: &BTreeMap<TxnId, Txn>,
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

/// Whether a record may go: see `Log::prune`.
pub(super) fn prunable(txn: &Txn, before_ms: i64) -> bool {
    txn.state.is_final() && !txn.forced && txn.finished_ms < before_ms
}

fn decode(key: &[u8], value: &[u8]) -> Result<Txn, LogError> {
    serde_json::from_slice(value).map_err(|source| LogError::Corrupt {
        key: TxnId::from_bytes(key).map_or_else(|| format!("{key:?}"), |id| id.to_string()),
        source,
    })
}

/// The log on sled, with group commit: concurrent `sync` calls share one `flush`.
pub struct SledLog {
    txns: sled::Tree,
    participants: sled::Tree,
    flusher: Flusher,
    marker_key: MarkerKey,
    /// Read, incremented and flushed at open.
    epoch: u64,
    _db: sled::Db,
}

impl SledLog {
    /// Opens (or creates) the log in `dir` and returns it with the coordinator's stable id:
    /// the one stored there, else `requested`, else a fresh random one.
    ///
    /// Starting empty is allowed only in an empty (or missing) directory: a directory that
    /// holds anything else is either someone else's or a damaged log, and starting empty there
    /// would turn every durable commit into a presumed abort.
    pub fn open(dir: &Path, requested: Option<&str>) -> Result<(Self, String), LogError> {
        let dir_text = dir.display().to_string();
        let fresh = std::fs::read_dir(dir).map_or(true, |mut entries| entries.next().is_none());
        // sled panics on some kinds of damage instead of returning an error.
        let open = || std::panic::catch_unwind(|| sled::Config::new().path(dir).open());
        let mut opened = open();
        // The directory's lock outlives a closed log by a moment (sled's threads let go of it
        // last), which matters to a coordinator restarted in the same process; another live
        // coordinator on the same directory keeps it, and gets the error below.
        for _ in 0..40 {
            match &opened {
                Ok(Err(e)) if is_locked(e) => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    opened = open();
                }
                _ => break,
            }
        }
        let db = match opened {
            Ok(db) => db.map_err(|e| LogError::Unreadable {
                dir: dir_text.clone(),
                reason: if is_locked(&e) {
                    "another process (a running coordinator?) holds its lock".into()
                } else {
                    e.to_string()
                },
            })?,
            Err(_) => {
                return Err(LogError::Unreadable {
                    dir: dir_text,
                    reason: "sled could not read it (see the panic message above)".into(),
                });
            }
        };
        let meta = db.open_tree("meta")?;
        match meta.get("format")? {
            None if !fresh => {
                return Err(LogError::NotALog { dir: dir_text });
            }
            Some(found) if found.as_ref() != FORMAT_VERSION.as_bytes() => {
                return Err(LogError::IncompatibleVersion {
                    dir: dir_text,
                    found: String::from_utf8_lossy(&found).into_owned(),
                });
            }
            Some(_) => {}
            None => {
                meta.insert("format", FORMAT_VERSION)?;
            }
        }
        let id = match (meta.get("coordinator_id")?, requested) {
            (Some(existing), requested) => {
                let existing = String::from_utf8_lossy(&existing).into_owned();
                if let Some(requested) = requested.filter(|r| *r != existing) {
                    return Err(LogError::IdMismatch {
                        dir: dir_text,
                        existing,
                        requested: requested.to_string(),
                    });
                }
                existing
            }
            (None, requested) => {
                let id = match requested {
                    Some(r) => r.to_string(),
                    None => format!("c-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
                };
                crate::proto::names::check_coordinator_id(&id)?;
                meta.insert("coordinator_id", id.as_bytes())?;
                id
            }
        };
        let marker_key = match meta.get("marker_key")? {
            Some(stored) => MarkerKey::from_bytes(&stored).ok_or_else(|| LogError::Unreadable {
                dir: dir_text.clone(),
                reason: format!(
                    "its marker key is {} bytes, not {}: the directory is damaged",
                    stored.len(),
                    super::marker_key::KEY_BYTES
                ),
            })?,
            // A new log, or one from before marker keys: no one-phase marker was addressed
            // by a key yet.
            None => {
                let key = MarkerKey::generate();
                meta.insert("marker_key", key.as_bytes())?;
                key
            }
        };
        let epoch = match meta.get("epoch")? {
            Some(stored) => {
                let bytes: [u8; 8] =
                    stored
                        .as_ref()
                        .try_into()
                        .map_err(|_| LogError::Unreadable {
                            dir: dir_text.clone(),
                            reason: format!(
                                "its epoch is {} bytes, not 8: the directory is damaged",
                                stored.len()
                            ),
                        })?;
                u64::from_be_bytes(bytes) + 1
            }
            None => 1,
        };
        meta.insert("epoch", &epoch.to_be_bytes())?;
        // The id, format and marker key must survive a crash before any gid carries the id
        // or any marker a secret; the epoch before any transaction is created in it.
        db.flush()?;
        let txns = db.open_tree("txns")?;
        let participants = db.open_tree("participants")?;
        let flusher = Flusher::start(db.clone());
        Ok((
            SledLog {
                txns,
                participants,
                flusher,
                marker_key,
                epoch,
                _db: db,
            },
            id,
        ))
    }
}

impl Log for SledLog {
    fn put(&self, txn: &Txn) -> Result<(), LogError> {
        let value = serde_json::to_vec(txn).expect("a Txn always serializes");
        self.txns.insert(txn.id.as_bytes(), value)?;
        Ok(())
    }

    fn sync(&self) -> impl Future<Output = Result<(), LogError>> + Send {
        self.flusher.sync()
    }

    fn get(&self, id: TxnId) -> Result<Option<Txn>, LogError> {
        match self.txns.get(id.as_bytes())? {
            Some(v) => decode(id.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    fn newest(&self, limit: usize, keep: &dyn Fn(&Txn) -> bool) -> Result<Vec<Txn>, LogError> {
        let mut out = Vec::new();
        for entry in self.txns.iter().rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry?;
            let txn = decode(&k, &v)?;
            if keep(&txn) {
                out.push(txn);
            }
        }
        Ok(out)
    }

    fn enlist(&self, participant_id: &str, endpoint: &str) -> Result<bool, LogError> {
        let old = self
            .participants
            .insert(participant_id, endpoint.as_bytes())?;
        Ok(old.as_deref() != Some(endpoint.as_bytes()))
    }

    fn prune(&self, before_ms: i64) -> Result<usize, LogError> {
        let mut pruned = 0;
        // Keys sort by creation time, and a transaction finishes after it is created: the
        // scan can stop at the first record created after the cutoff.
        for entry in self.txns.iter() {
            let (k, v) = entry?;
            let txn = decode(&k, &v)?;
            if txn.created_ms >= before_ms {
                break;
            }
            if prunable(&txn, before_ms) {
                self.txns.remove(k)?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    fn participants(&self) -> Result<Vec<(String, String)>, LogError> {
        self.participants
            .iter()
            .map(|e| {
                let (k, v) = e?;
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .collect()
    }
    fn marker_key(&self) -> MarkerKey {
        self.marker_key.clone()
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// An in-memory log for tests. `crash()` returns the log a restarted process would find:
/// only what was synced. Clones share one log.
#[derive(Clone, Default)]
pub struct MemLog {
    inner: Arc<Mutex<MemInner>>,
}

struct MemInner {
    written: BTreeMap<TxnId, Txn>,
    durable: BTreeMap<TxnId, Txn>,
    participants: BTreeMap<String, String>,
    /// Survives `crash`, as the real logs' keys do.
    marker_key: MarkerKey,
    /// One more at every `crash`, as at every start of a real log.
    epoch: u64,
    syncs: usize,
    /// Syncs never complete, as on a disk that hangs mid-fsync.
    stalled: bool,
}

impl MemLog {
    pub fn crash(&self) -> MemLog {
        let inner = self.inner.lock().unwrap();
        MemLog {
            inner: Arc::new(Mutex::new(MemInner {
                written: inner.durable.clone(),
                durable: inner.durable.clone(),
                participants: inner.participants.clone(),
                marker_key: inner.marker_key.clone(),
                epoch: inner.epoch + 1,
                syncs: 0,
                stalled: false,
            })),
        }
    }

    /// From now on no sync completes and nothing more becomes durable: a test can stop the
    /// coordinator between writing a decision and its flush.
    pub fn stall_syncs(&self) {
        self.inner.lock().unwrap().stalled = true;
    }

    /// How many times `sync` ran: the forced writes the protocol paid for.
    pub fn syncs(&self) -> usize {
        self.inner.lock().unwrap().syncs
    }
}

impl Log for MemLog {
    fn put(&self, txn: &Txn) -> Result<(), LogError> {
        self.inner
            .lock()
            .unwrap()
            .written
            .insert(txn.id, txn.clone());
        Ok(())
    }

    fn sync(&self) -> impl Future<Output = Result<(), LogError>> + Send {
        let mut inner = self.inner.lock().unwrap();
        let stalled = inner.stalled;
        if !stalled {
            inner.durable = inner.written.clone();
            inner.syncs += 1;
        }
        async move {
            if stalled {
                std::future::pending::<()>().await;
            }
            Ok(())
        }
    }

    fn get(&self, id: TxnId) -> Result<Option<Txn>, LogError> {
        Ok(self.inner.lock().unwrap().written.get(&id).cloned())
    }

    fn newest(&self, limit: usize, keep: &dyn Fn(&Txn) -> bool) -> Result<Vec<Txn>, LogError> {
        Ok(newest_in(&self.inner.lock().unwrap().written, limit, keep))
    }

    fn enlist(&self, participant_id: &str, endpoint: &str) -> Result<bool, LogError> {
        let mut inner = self.inner.lock().unwrap();
        let old = inner
            .participants
            .insert(participant_id.into(), endpoint.into());
        Ok(old.as_deref() != Some(endpoint))
    }

    fn prune(&self, before_ms: i64) -> Result<usize, LogError> {
        let mut inner = self.inner.lock().unwrap();
        let before = inner.written.len();
        inner.written.retain(|_, t| !prunable(t, before_ms));
        Ok(before - inner.written.len())
    }

    fn participants(&self) -> Result<Vec<(String, String)>, LogError> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .participants
            .clone()
            .into_iter()
            .collect())
    }
    fn marker_key(&self) -> MarkerKey {
        self.inner.lock().unwrap().marker_key.clone()
    }

    fn epoch(&self) -> u64 {
        self.inner.lock().unwrap().epoch
    }
}

impl Default for MemInner {
    fn default() -> Self {
        MemInner {
            written: BTreeMap::new(),
            durable: BTreeMap::new(),
            participants: BTreeMap::new(),
            marker_key: MarkerKey::generate(),
            epoch: 1,
            syncs: 0,
            stalled: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::txn::State;

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
