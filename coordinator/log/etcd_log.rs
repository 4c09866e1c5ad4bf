//! The decision log on etcd: durable once a quorum of etcd members has it, so losing the
//! coordinator's machine loses no decision (docs/HA.md).
//!
//! Only the leading replica touches the log, so it keeps the whole log in memory, loaded at the
//! start of its term, and etcd is written, never read, while it leads: the protocol's reads
//! (`get`, `newest`, `unfinished`) stay synchronous and cheap, exactly as on sled.
//!
//! Writes queue in memory and one writer task sends them: every `sync` waits for the etcd
//! transaction that carries everything queued before it, and while one transaction is in
//! flight the next batch gathers, which is group commit with no timer. Every transaction is
//! conditioned on the [`Fence`], the leader key this replica created: once another replica has
//! taken over (its key is a new key, with a new create revision) every write of the deposed one
//! fails, whatever its clock says, so it can never record a decision after the takeover.
//!
//! A write that fails in transport is sent again until the write timeout. Every transaction
//! also expects and advances the write sequence (`meta/write_sequence`), so exactly one copy of
//! a write applies, and in order: a late copy can never put back an older record (an active
//! transaction over its commit decision). A write still failing at the timeout, or refused by
//! the fence, fails every `sync` from then on: the coordinator stops (as on a failed fsync), and
//! the next leader reads what etcd holds. Queued hints that no `sync` waits for go out within
//! [`IDLE_FLUSH`].
//!
//! Keys, under the cluster's prefix: `meta/format`, `meta/coordinator_id`, `meta/marker_key`,
//! `meta/write_sequence`, `leader` (see `leader.rs`), `txns/<txn id>` (JSON of the [`Txn`];
//! hyphenated UUIDv7s sort by creation) and `participants/<id>` (its endpoint).

use super::{FORMAT_VERSION, Log, LogError};
use crate::coordinator::marker_key::MarkerKey;
use crate::coordinator::saga::Saga;
use crate::coordinator::txn::Txn;
use crate::proto::TxnId;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn as EtcdTxn, TxnOp, TxnOpResponse};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// etcd refuses a transaction of more than 128 operations (`--max-txn-ops`); a batch larger
/// than this (plus the write sequence's put) goes as several.
const MAX_OPS: usize = 120;

/// How long queued hints may wait for a `sync` before the writer sends them anyway.
const IDLE_FLUSH: Duration = Duration::from_secs(1);

/// Records read per request when a term starts.
const PAGE: i64 = 5_000;

/// The leader key this replica created: writes go through only while it still exists with this
/// create revision (`leader.rs` creates it, with the replica's lease).
#[derive(Clone, Debug)]
pub struct Fence {
    pub key: String,
    pub revision: i64,
}

impl Fence {
    fn holds(&self) -> Compare {
        Compare::create_revision(self.key.as_bytes(), CompareOp::Equal, self.revision)
    }
}

/// Where a term's writes go and what they must be conditioned on.
#[derive(Clone)]
pub struct EtcdTarget {
    pub client: Client,
    /// `--etcd-prefix`, ending in `/`: one twopc cluster's keys.
    pub prefix: String,
    pub fence: Fence,
    /// How long one etcd write may take before the coordinator gives up on it (and stops).
    pub write_timeout: Duration,
}

/// The log on etcd: the whole log in memory, writes batched to etcd, fenced.
pub struct EtcdLog {
    shared: Arc<Shared>,
    writer: tokio::task::JoinHandle<()>,
    /// Read (or created) at open; it never changes.
    marker_key: MarkerKey,
    /// The create revision of this term's leader key: etcd makes every later term's larger.
    epoch: u64,
}

struct Shared {
    mirror: Mutex<Mirror>,
    wake: Notify,
    /// How far the writer has written: every change up to this generation is in etcd. `Err`
    /// once a write failed: nothing is known to be durable after that.
    written: watch::Sender<Result<u64, String>>,
}

#[derive(Default)]
struct Mirror {
    txns: BTreeMap<TxnId, Txn>,
    sagas: BTreeMap<String, Saga>,
    participants: BTreeMap<String, String>,
    /// Changes not yet sent, by key (a later change of a key replaces an earlier one): a value
    /// to put, or `None` to delete.
    queued: BTreeMap<String, Option<Vec<u8>>>,
    /// Counts changes; `sync` waits until `written` reaches the count it saw.
    generation: u64,
}

impl Mirror {
    fn queue(&mut self, key: String, value: Option<Vec<u8>>) {
        self.queued.insert(key, value);
        self.generation += 1;
    }
}

impl EtcdLog {
    /// Loads the log under `target.prefix` (creating it, and the coordinator's id, on first
    /// start) and returns it with the coordinator's stable id, which every replica shares.
    pub async fn open(
        target: EtcdTarget,
        requested: Option<&str>,
    ) -> Result<(Self, String), LogError> {
        let mut kv = target.client.kv_client();
        let p = &target.prefix;
        let (format_key, id_key) = (format!("{p}meta/format"), format!("{p}meta/coordinator_id"));
        let meta = |r: etcd_client::GetResponse| r.kvs().first().map(|kv| kv.value().to_vec());
        let format = meta(kv.get(format_key.as_str(), None).await.map_err(etcd)?);
        let existing = meta(kv.get(id_key.as_str(), None).await.map_err(etcd)?)
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        match &format {
            Some(found) if found.as_slice() != FORMAT_VERSION.as_bytes() => {
                return Err(LogError::IncompatibleVersion {
                    dir: format!("etcd prefix {p}"),
                    found: String::from_utf8_lossy(found).into_owned(),
                });
            }
            _ => {}
        }
        let id = match (existing, requested) {
            (Some(existing), Some(requested)) if existing != requested => {
                return Err(LogError::IdMismatch {
                    dir: format!("etcd prefix {p}"),
                    existing,
                    requested: requested.into(),
                });
            }
            (Some(existing), _) => existing,
            (None, requested) => {
                let id = match requested {
                    Some(r) => r.to_string(),
                    None => format!("c-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
                };
                crate::proto::names::check_coordinator_id(&id)?;
                // Only the leader writes, and only if nobody wrote an id meanwhile.
                let created = kv
                    .txn(
                        EtcdTxn::new()
                            .when([
                                target.fence.holds(),
                                Compare::version(id_key.as_bytes(), CompareOp::Equal, 0),
                            ])
                            .and_then([
                                TxnOp::put(format_key.as_bytes(), FORMAT_VERSION, None),
                                TxnOp::put(id_key.as_bytes(), id.as_bytes(), None),
                            ]),
                    )
                    .await
                    .map_err(etcd)?;
                if !created.succeeded() {
                    return Err(LogError::Etcd(
                        "the coordinator id changed or this replica lost the lead while the log was being created; start again".into(),
                    ));
                }
                id
            }
        };

        let marker_key = marker_key(&mut kv, &target).await?;
        let epoch = target.fence.revision as u64;

        let mut mirror = Mirror::default();
        for (key, value) in read_all(&mut kv, &format!("{p}txns/")).await? {
            let txn: Txn = serde_json::from_slice(&value).map_err(|source| LogError::Corrupt {
                key: key.clone(),
                source,
            })?;
            mirror.txns.insert(txn.id, txn);
        }
        for (key, value) in read_all(&mut kv, &format!("{p}sagas/")).await? {
            let saga: Saga =
                serde_json::from_slice(&value).map_err(|source| LogError::Corrupt {
                    key: key.clone(),
                    source,
                })?;
            mirror.sagas.insert(saga.id.clone(), saga);
        }
        let participants_prefix = format!("{p}participants/");
        for (key, value) in read_all(&mut kv, &participants_prefix).await? {
            mirror.participants.insert(
                key[participants_prefix.len()..].to_string(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
        tracing::info!(
            prefix = %p,
            transactions = mirror.txns.len(),
            participants = mirror.participants.len(),
            "decision log loaded from etcd"
        );

        let sequence_key = format!("{p}meta/write_sequence");
        let at = meta(kv.get(sequence_key.as_str(), None).await.map_err(etcd)?)
            .map(|v| {
                String::from_utf8_lossy(&v)
                    .parse::<u64>()
                    .map_err(|_| LogError::Etcd(format!("{sequence_key} holds no number")))
            })
            .transpose()?;
        let sequence = Sequence {
            key: sequence_key,
            at,
        };
        let shared = Arc::new(Shared {
            mirror: Mutex::new(mirror),
            wake: Notify::new(),
            written: watch::channel(Ok(0)).0,
        });
        let writer = tokio::spawn(write_forever(Arc::clone(&shared), target, sequence));
        Ok((
            EtcdLog {
                shared,
                writer,
                marker_key,
                epoch,
            },
            id,
        ))
    }
}

/// The log's marker key, created on the first start that finds none (a new log, or one from
/// before marker keys), by the leader only and only if nobody created one meanwhile; then read
/// back, so every replica uses the one that won.
async fn marker_key(
    kv: &mut etcd_client::KvClient,
    target: &EtcdTarget,
) -> Result<MarkerKey, LogError> {
    let key = format!("{}meta/marker_key", target.prefix);
    let read = |r: etcd_client::GetResponse| r.kvs().first().map(|kv| kv.value().to_vec());
    let stored = match read(kv.get(key.as_str(), None).await.map_err(etcd)?) {
        Some(stored) => stored,
        None => {
            let fresh = MarkerKey::generate();
            kv.txn(
                EtcdTxn::new()
                    .when([
                        target.fence.holds(),
                        Compare::version(key.as_bytes(), CompareOp::Equal, 0),
                    ])
                    .and_then([TxnOp::put(key.as_bytes(), fresh.as_bytes(), None)]),
            )
            .await
            .map_err(etcd)?;
            read(kv.get(key.as_str(), None).await.map_err(etcd)?).ok_or_else(|| {
                LogError::Etcd(format!(
                    "{key} is missing and this replica could not create it (it lost the lead?); start again"
                ))
            })?
        }
    };
    MarkerKey::from_bytes(&stored).ok_or_else(|| {
        LogError::Etcd(format!(
            "{key} holds {} bytes, not a marker key of {}",
            stored.len(),
            crate::coordinator::marker_key::KEY_BYTES
        ))
    })
}

/// A transaction's key, relative to the prefix.
fn txn_key(id: TxnId) -> String {
    format!("txns/{id}")
}

impl Drop for EtcdLog {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// Every key under `prefix` (relative keys are full keys here), in key order, page by page.
async fn read_all(
    kv: &mut etcd_client::KvClient,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>)>, LogError> {
    let end = prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut all = Vec::new();
    loop {
        let page = kv
            .get(
                from.clone(),
                Some(GetOptions::new().with_range(end.clone()).with_limit(PAGE)),
            )
            .await
            .map_err(etcd)?;
        for kv in page.kvs() {
            all.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            ));
        }
        match (page.more(), page.kvs().last()) {
            (true, Some(last)) => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(all),
        }
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("a non-empty prefix") += 1;
    end
}

fn etcd(e: etcd_client::Error) -> LogError {
    LogError::Etcd(e.to_string())
}

/// The writer: sends what is queued whenever a `sync` asks (or `IDLE_FLUSH` passes), one
/// fenced etcd transaction per `MAX_OPS` changes, and stops at the first failure.
async fn write_forever(shared: Arc<Shared>, target: EtcdTarget, mut sequence: Sequence) {
    let mut kv = target.client.kv_client();
    loop {
        let _ = tokio::time::timeout(IDLE_FLUSH, shared.wake.notified()).await;
        let (batch, generation) = {
            let mut mirror = shared.mirror.lock().unwrap();
            (std::mem::take(&mut mirror.queued), mirror.generation)
        };
        let started = std::time::Instant::now();
        let ops: Vec<TxnOp> = batch
            .into_iter()
            .map(|(key, value)| {
                let key = format!("{}{key}", target.prefix);
                match value {
                    Some(value) => TxnOp::put(key, value, None),
                    None => TxnOp::delete(key, None),
                }
            })
            .collect();
        let batches = ops.len().div_ceil(MAX_OPS);
        let mut ops = ops.into_iter();
        for _ in 0..batches {
            let chunk: Vec<TxnOp> = ops.by_ref().take(MAX_OPS).collect();
            if let Err(failure) = write(&mut kv, &target, &mut sequence, chunk).await {
                let _ = shared.written.send_replace(Err(failure));
                return;
            }
        }
        if batches > 0 {
            metrics::histogram!("twopc_log_flush_seconds").record(started.elapsed());
        }
        shared.written.send_modify(|w| {
            if let Ok(w) = w {
                *w = (*w).max(generation);
            }
        });
    }
}

/// The log's write sequence: the number of etcd transactions the log has had, kept in etcd
/// beside the records. Every write expects the number it last set and sets the next, so the
/// writes of one leader apply exactly once and in order, even when one is sent again: a copy of
/// an earlier write that etcd gets to late (a member that died with it, a forwarded proposal)
/// finds the sequence moved on, and changes nothing.
struct Sequence {
    key: String,
    /// The value in etcd; `None`: the key does not exist yet.
    at: Option<u64>,
}

impl Sequence {
    fn expected(&self) -> Compare {
        match self.at {
            Some(n) => Compare::value(self.key.as_bytes(), CompareOp::Equal, n.to_string()),
            None => Compare::version(self.key.as_bytes(), CompareOp::Equal, 0),
        }
    }

    fn next(&self) -> u64 {
        self.at.map_or(1, |n| n + 1)
    }
}

/// One fenced etcd transaction, sent again after a transport error (an etcd member died, say)
/// until `write_timeout` has passed. Sending it again is safe: the sequence lets at most one copy
/// apply, and a refusal that shows the sequence already at this write's number means an earlier
/// copy applied.
async fn write(
    kv: &mut etcd_client::KvClient,
    target: &EtcdTarget,
    sequence: &mut Sequence,
    mut ops: Vec<TxnOp>,
) -> Result<(), String> {
    let next = sequence.next();
    ops.push(TxnOp::put(sequence.key.as_bytes(), next.to_string(), None));
    let until = tokio::time::Instant::now() + target.write_timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        let txn = EtcdTxn::new()
            .when([target.fence.holds(), sequence.expected()])
            .and_then(ops.clone())
            .or_else([
                TxnOp::get(target.fence.key.as_bytes(), None),
                TxnOp::get(sequence.key.as_bytes(), None),
            ]);
        let error = match tokio::time::timeout_at(until, kv.txn(txn)).await {
            Ok(Ok(reply)) if reply.succeeded() => {
                sequence.at = Some(next);
                return Ok(());
            }
            Ok(Ok(reply)) => {
                let found: Vec<Option<(i64, Vec<u8>)>> = reply
                    .op_responses()
                    .into_iter()
                    .map(|r| match r {
                        TxnOpResponse::Get(get) => get
                            .kvs()
                            .first()
                            .map(|kv| (kv.create_revision(), kv.value().to_vec())),
                        _ => None,
                    })
                    .collect();
                let leads =
                    matches!(found.first(), Some(Some((rev, _))) if *rev == target.fence.revision);
                let landed = matches!(found.get(1), Some(Some((_, v))) if *v == next.to_string().into_bytes());
                if !leads {
                    return Err(format!(
                        "etcd refused the write: this replica no longer leads (leader key {} is gone or is another replica's)",
                        target.fence.key
                    ));
                }
                if landed {
                    // An earlier copy of this very write applied.
                    sequence.at = Some(next);
                    return Ok(());
                }
                return Err(format!(
                    "etcd refused the write: the log's write sequence {} is not at {:?}; another writer?",
                    sequence.key, sequence.at
                ));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".into(),
        };
        if tokio::time::Instant::now() + pause >= until {
            return Err(format!(
                "etcd write failed for {:?} ({error}): its outcome is unknown",
                target.write_timeout
            ));
        }
        tracing::warn!(%error, "etcd write failed; sending it again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

impl Log for EtcdLog {
    fn put(&self, txn: &Txn) -> Result<(), LogError> {
        let value = serde_json::to_vec(txn).expect("a Txn always serialises");
        let key = txn_key(txn.id);
        let mut mirror = self.shared.mirror.lock().unwrap();
        mirror.txns.insert(txn.id, txn.clone());
        mirror.queue(key, Some(value));
        Ok(())
    }

    fn sync(&self) -> impl Future<Output = Result<(), LogError>> + Send {
        let ticket = self.shared.mirror.lock().unwrap().generation;
        let mut written = self.shared.written.subscribe();
        self.shared.wake.notify_one();
        async move {
            let reached = written
                .wait_for(|w| match w {
                    Ok(w) => *w >= ticket,
                    Err(_) => true,
                })
                .await;
            match reached.as_deref() {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(failure)) => Err(LogError::Etcd(failure.clone())),
                Err(_) => Err(LogError::Etcd("the etcd writer stopped".into())),
            }
        }
    }

    fn get(&self, id: TxnId) -> Result<Option<Txn>, LogError> {
        Ok(self.shared.mirror.lock().unwrap().txns.get(&id).cloned())
    }

    fn newest(&self, limit: usize, keep: &dyn Fn(&Txn) -> bool) -> Result<Vec<Txn>, LogError> {
        Ok(super::newest_in(
            &self.shared.mirror.lock().unwrap().txns,
            limit,
            keep,
        ))
    }

    fn put_saga(&self, saga: &Saga) -> Result<(), LogError> {
        let value = serde_json::to_vec(saga).expect("a Saga always serialises");
        let mut mirror = self.shared.mirror.lock().unwrap();
        mirror.sagas.insert(saga.id.clone(), saga.clone());
        mirror.queue(format!("sagas/{}", saga.id), Some(value));
        Ok(())
    }

    fn get_saga(&self, id: &str) -> Result<Option<Saga>, LogError> {
        Ok(self.shared.mirror.lock().unwrap().sagas.get(id).cloned())
    }

    fn delete_saga(&self, id: &str) -> Result<(), LogError> {
        let mut mirror = self.shared.mirror.lock().unwrap();
        mirror.sagas.remove(id);
        mirror.queue(format!("sagas/{id}"), None);
        Ok(())
    }

    fn sagas(&self) -> Result<Vec<Saga>, LogError> {
        Ok(self
            .shared
            .mirror
            .lock()
            .unwrap()
            .sagas
            .values()
            .cloned()
            .collect())
    }

    fn enlist(&self, participant_id: &str, endpoint: &str) -> Result<bool, LogError> {
        let mut mirror = self.shared.mirror.lock().unwrap();
        let old = mirror
            .participants
            .insert(participant_id.into(), endpoint.into());
        let moved = old.as_deref() != Some(endpoint);
        if moved {
            mirror.queue(
                format!("participants/{participant_id}"),
                Some(endpoint.as_bytes().to_vec()),
            );
        }
        Ok(moved)
    }

    fn participants(&self) -> Result<Vec<(String, String)>, LogError> {
        let mirror = self.shared.mirror.lock().unwrap();
        Ok(mirror
            .participants
            .iter()
            .map(|(id, endpoint)| (id.clone(), endpoint.clone()))
            .collect())
    }

    fn marker_key(&self) -> MarkerKey {
        self.marker_key.clone()
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn prune(&self, before_ms: i64) -> Result<usize, LogError> {
        let mut mirror = self.shared.mirror.lock().unwrap();
        let gone: Vec<TxnId> = mirror
            .txns
            .values()
            .filter(|t| super::prunable(t, before_ms))
            .map(|t| t.id)
            .collect();
        for id in &gone {
            mirror.txns.remove(id);
            mirror.queue(txn_key(*id), None);
        }
        drop(mirror);
        self.shared.wake.notify_one();
        Ok(gone.len())
    }
}

#[cfg(test)]
mod tests {
    //! Against a real single-member etcd (`testkit::EtcdCluster`): what matters here is what
    //! etcd does with a fenced transaction, which no fake would tell.
    use super::*;
    use crate::coordinator::ha::leader::{Election, Leadership};
    use crate::coordinator::txn::State;
    use crate::testkit::EtcdCluster;

    struct Setup {
        _etcd: EtcdCluster,
        client: Client,
    }

    async fn etcd() -> Setup {
        let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(1))
            .await
            .unwrap()
            .unwrap();
        let client = Client::connect(etcd.endpoints(), None).await.unwrap();
        Setup {
            _etcd: etcd,
            client,
        }
    }

    async fn lead(client: &Client, name: &str) -> Leadership {
        Election {
            client: client.clone(),
            key: "/t/leader".into(),
            advertise: format!("http://{name}"),
            lease_ttl: Duration::from_secs(2),
        }
        .win(|_| {})
        .await
    }

    /// Where `leadership`'s log writes, under `/t/`.
    fn target(client: &Client, leadership: &Leadership) -> EtcdTarget {
        EtcdTarget {
            client: client.clone(),
            prefix: "/t/".into(),
            fence: leadership.fence.clone(),
            write_timeout: Duration::from_secs(5),
        }
    }

    async fn open(client: &Client, leadership: &Leadership) -> EtcdLog {
        EtcdLog::open(target(client, leadership), Some("cluster-a"))
            .await
            .unwrap()
            .0
    }

    fn txn() -> Txn {
        Txn::begin(TxnId::generate(), "label".into(), 1, 2)
    }

    #[tokio::test]
    async fn the_next_leader_reads_every_synced_record_and_the_same_id() {
        let Setup { _etcd, client } = etcd().await;
        let first = lead(&client, "a").await;
        let log = open(&client, &first).await;
        let records: Vec<Txn> = (0..300).map(|_| txn()).collect();
        for t in &records {
            log.put(t).unwrap();
        }
        assert!(log.enlist("p1", "http://p1").unwrap());
        let saga = crate::coordinator::saga::tests::saga("order-1");
        log.put_saga(&saga).unwrap();
        log.sync().await.unwrap();
        drop(log);
        first.resign().await;

        let second = lead(&client, "b").await;
        let target = target(&client, &second);
        let (log, id) = EtcdLog::open(target, None).await.unwrap();

        assert_eq!(
            id, "cluster-a",
            "replicas share the id that names the cluster"
        );
        assert_eq!(
            log.newest(usize::MAX, &|_| true).unwrap().len(),
            300,
            "more than one etcd transaction's worth"
        );
        assert_eq!(log.get(records[7].id).unwrap().as_ref(), Some(&records[7]));
        assert_eq!(
            log.participants().unwrap(),
            vec![("p1".to_string(), "http://p1".to_string())]
        );
        assert_eq!(log.get_saga("order-1").unwrap(), Some(saga.clone()));
        assert_eq!(log.unfinished_sagas().unwrap(), vec![saga]);
    }

    #[tokio::test]
    async fn a_deposed_leader_cannot_write_a_decision() {
        let Setup { _etcd, client } = etcd().await;
        let first = lead(&client, "a").await;
        let stale = open(&client, &first).await;
        // The first leader's lease ends (here by resigning; a pause past the TTL ends it the
        // same way) and another replica takes over.
        first.resign().await;
        let _second = lead(&client, "b").await;

        let mut decided = txn();
        decided.state = State::Committing;
        stale.put(&decided).unwrap();
        let synced = stale.sync().await;

        assert!(
            matches!(&synced, Err(LogError::Etcd(why)) if why.contains("no longer leads")),
            "{synced:?}"
        );
        let mut kv = client.kv_client();
        let stored = kv
            .get(format!("/t/txns/{}", decided.id), None)
            .await
            .unwrap();
        assert!(stored.kvs().is_empty(), "the fenced decision reached etcd");
    }

    /// A write whose answer was lost is sent again; if the first copy had applied, the second
    /// finds the sequence at its own number and counts as done. A copy that etcd gets to after
    /// a later write (a forwarded proposal, say) changes nothing: a record never goes back to an
    /// older state, which would turn a commit decision back into an active transaction.
    #[tokio::test]
    async fn every_write_applies_once_and_in_order_whatever_the_copies() {
        let Setup { _etcd, client } = etcd().await;
        let leader = lead(&client, "a").await;
        let target = target(&client, &leader);
        let mut kv = client.kv_client();
        let sequence = || Sequence {
            key: "/t/meta/write_sequence".into(),
            at: None,
        };
        let (mut writer, mut resent, mut late) = (sequence(), sequence(), sequence());
        let active = vec![TxnOp::put("/t/txns/x", "active", None)];

        write(&mut kv, &target, &mut writer, active.clone())
            .await
            .unwrap();
        let again = write(&mut kv, &target, &mut resent, active.clone()).await;
        assert!(again.is_ok(), "{again:?}");
        assert_eq!(
            resent.at,
            Some(1),
            "the copy counts as the write it repeats"
        );
        write(
            &mut kv,
            &target,
            &mut writer,
            vec![TxnOp::put("/t/txns/x", "committing", None)],
        )
        .await
        .unwrap();
        let stale = write(&mut kv, &target, &mut late, active).await;

        assert!(stale.is_err(), "a late copy of the first write applied");
        let stored = kv.get("/t/txns/x", None).await.unwrap();
        assert_eq!(stored.kvs()[0].value(), b"committing");
    }

    #[tokio::test]
    async fn pruned_records_leave_etcd_too() {
        let Setup { _etcd, client } = etcd().await;
        let leader = lead(&client, "a").await;
        let log = open(&client, &leader).await;
        let mut done = txn();
        done.state = State::Committed;
        done.finished_ms = 10;
        let open_one = txn();
        log.put(&done).unwrap();
        log.put(&open_one).unwrap();
        log.sync().await.unwrap();

        assert_eq!(log.prune(100).unwrap(), 1);
        log.sync().await.unwrap();

        let mut kv = client.kv_client();
        let left = kv
            .get("/t/txns/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        let keys: Vec<String> = left
            .kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap().to_string())
            .collect();
        assert_eq!(keys, vec![format!("/t/txns/{}", open_one.id)]);
    }
}
