//! The decision log on the coordinator's own disk: sled, with group commit (`flusher.rs`), so
//! concurrent commit decisions share one fsync.

use super::flusher::Flusher;
use super::{FORMAT_VERSION, Log, LogError, prunable};
use crate::coordinator::marker_key::MarkerKey;
use crate::coordinator::saga::Saga;
use crate::coordinator::txn::Txn;
use crate::proto::TxnId;
use std::future::Future;
use std::path::Path;

/// sled's "could not acquire lock" (it wraps the OS's WouldBlock in an error of its own kind).
fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock
        || io.to_string().contains("could not acquire lock"))
}

fn decode_saga(id: &str, value: &[u8]) -> Result<Saga, LogError> {
    serde_json::from_slice(value).map_err(|source| LogError::Corrupt {
        key: format!("saga {id}"),
        source,
    })
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
    /// Saga records by saga id (docs/SAGAS.md §3).
    sagas: sled::Tree,
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
                    crate::coordinator::marker_key::KEY_BYTES
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
        let sagas = db.open_tree("sagas")?;
        let participants = db.open_tree("participants")?;
        let flusher = Flusher::start(db.clone());
        Ok((
            SledLog {
                txns,
                sagas,
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

    fn put_saga(&self, saga: &Saga) -> Result<(), LogError> {
        let value = serde_json::to_vec(saga).expect("a Saga always serializes");
        self.sagas.insert(saga.id.as_bytes(), value)?;
        Ok(())
    }

    fn get_saga(&self, id: &str) -> Result<Option<Saga>, LogError> {
        match self.sagas.get(id.as_bytes())? {
            Some(v) => decode_saga(id, &v).map(Some),
            None => Ok(None),
        }
    }

    fn delete_saga(&self, id: &str) -> Result<(), LogError> {
        self.sagas.remove(id.as_bytes())?;
        Ok(())
    }

    fn sagas(&self) -> Result<Vec<Saga>, LogError> {
        let mut sagas = Vec::new();
        for entry in self.sagas.iter() {
            let (k, v) = entry?;
            sagas.push(decode_saga(&String::from_utf8_lossy(&k), &v)?);
        }
        Ok(sagas)
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
