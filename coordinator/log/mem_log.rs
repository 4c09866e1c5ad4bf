//! The decision log in memory, for tests: it tells written from durable, so a scenario can
//! crash the coordinator and see only what a power cut would have left.

use super::{Log, LogError, newest_in, prunable};
use crate::coordinator::marker_key::MarkerKey;
use crate::coordinator::saga::Saga;
use crate::coordinator::txn::Txn;
use crate::proto::TxnId;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

/// An in-memory log for tests. `crash()` returns the log a restarted process would find:
/// only what was synced. Clones share one log.
#[derive(Clone, Default)]
pub struct MemLog {
    inner: Arc<Mutex<MemInner>>,
}

struct MemInner {
    written: BTreeMap<TxnId, Txn>,
    durable: BTreeMap<TxnId, Txn>,
    sagas_written: BTreeMap<String, Saga>,
    sagas_durable: BTreeMap<String, Saga>,
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
                sagas_written: inner.sagas_durable.clone(),
                sagas_durable: inner.sagas_durable.clone(),
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
            inner.sagas_durable = inner.sagas_written.clone();
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

    fn put_saga(&self, saga: &Saga) -> Result<(), LogError> {
        let mut inner = self.inner.lock().unwrap();
        inner.sagas_written.insert(saga.id.clone(), saga.clone());
        Ok(())
    }

    fn get_saga(&self, id: &str) -> Result<Option<Saga>, LogError> {
        Ok(self.inner.lock().unwrap().sagas_written.get(id).cloned())
    }

    fn delete_saga(&self, id: &str) -> Result<(), LogError> {
        let mut inner = self.inner.lock().unwrap();
        inner.sagas_written.remove(id);
        Ok(())
    }

    fn sagas(&self) -> Result<Vec<Saga>, LogError> {
        let inner = self.inner.lock().unwrap();
        Ok(inner.sagas_written.values().cloned().collect())
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
            sagas_written: BTreeMap::new(),
            sagas_durable: BTreeMap::new(),
            participants: BTreeMap::new(),
            marker_key: MarkerKey::generate(),
            epoch: 1,
            syncs: 0,
            stalled: false,
        }
    }
}
