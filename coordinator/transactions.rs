//! The coordinator's table of transactions: the decision log, the table of live transactions, and the
//! participants it drives. Live transactions are in memory, finished ones in the log.
//!
//! A transaction is *live* from Begin until every branch has acknowledged phase 2; its [`Txn`]
//! state machine sits behind a mutex, beside a watch channel that tells waiting RPCs when the
//! outcome may be announced and when the branches are done. Once final, its record is written to
//! the log and it leaves memory, so the table holds only what is in flight.
//!
//! Announcing is separate from deciding: a commit decision is announced (to Commit, Abort,
//! GetTransaction and QueryOutcome alike) only after the log flush that makes it durable.

use super::error::Error;
use super::log::Log;
use super::participants::{GrpcParticipants, Participants};
use super::registry::Registry;
use super::txn::{Outcome, State, Txn};
use crate::process::auth::Bearer;
use crate::process::tls::Tls;
use crate::proto::{Start, TxnId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Timeouts and limits of the protocol.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Begin's timeout when the client gives none.
    pub default_timeout: Duration,
    /// The longest timeout a client may ask for.
    pub max_timeout: Duration,
    /// How long phase 1 waits for a vote before counting it as no.
    pub prepare_timeout: Duration,
    /// How long Commit waits for phase 2 acknowledgements before answering anyway.
    pub commit_wait: Duration,
    /// Backoff between phase-2 retries to an unreachable participant.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How long an abort's rollback is re-sent to a participant that cannot be reached before
    /// it is left to presumed abort (`Txn::may_abandon`).
    pub rollback_retry_for: Duration,
    /// How often enlisted participants are asked for orphaned prepared branches.
    pub orphan_scan_interval: Duration,
    /// How long a finished transaction's record is kept; `None`: for ever.
    pub retain_finished: Option<Duration>,
    /// Commit a lone branch in one phase when its participant can (docs/PROTOCOL.md).
    pub one_phase: bool,
    /// The most transactions live at once (Begin beyond it: RESOURCE_EXHAUSTED).
    pub max_live: usize,
    /// The most participants one transaction may enlist.
    pub max_branches: usize,
    /// The only participants (id → endpoint) this coordinator enlists; `None`: any.
    pub allowed_participants: Option<HashMap<String, String>>,
    /// How often the participants of live transactions are asked for lock waits to find
    /// distributed deadlocks (`detector.rs`); `None`: never.
    pub deadlock_interval: Option<Duration>,
    /// Waits shorter than this are not reported: most waits end on their own.
    pub deadlock_min_wait: Duration,
    /// How often the enlisted participants' health is checked (`ListParticipants`); None: never.
    pub health_check_interval: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(3600),
            prepare_timeout: Duration::from_secs(10),
            commit_wait: Duration::from_secs(5),
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            rollback_retry_for: Duration::from_secs(300),
            orphan_scan_interval: Duration::from_secs(10),
            retain_finished: Some(Duration::from_secs(7 * 24 * 3600)),
            one_phase: true,
            max_live: 100_000,
            max_branches: 64,
            allowed_participants: None,
            deadlock_interval: Some(Duration::from_millis(50)),
            deadlock_min_wait: Duration::from_millis(50),
            health_check_interval: Some(Duration::from_secs(2)),
        }
    }
}

/// What waiting RPCs may know of a live transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Progress {
    /// `Pending` until the outcome may be told: for a commit, once it is durable.
    pub announced: Outcome,
    /// Every branch acknowledged phase 2.
    pub finished: bool,
}

/// A transaction in flight: its state machine, and what may be told of it.
pub(super) struct Live {
    pub txn: Mutex<Txn>,
    pub progress: watch::Sender<Progress>,
}

impl Live {
    /// A transaction that becomes live with `announced` already told (`Pending` for a new one;
    /// a recovered one's decision is durable, so it may be told at once).
    pub fn new(txn: Txn, announced: Outcome) -> Arc<Live> {
        Arc::new(Live {
            txn: Mutex::new(txn),
            progress: watch::Sender::new(Progress {
                announced,
                finished: false,
            }),
        })
    }

    pub fn announce(&self, outcome: Outcome) {
        self.progress.send_modify(|p| p.announced = outcome);
    }

    /// The span a protocol run logs in: the transaction and its participants, on every line.
    pub fn span(&self, run: &'static str) -> tracing::Span {
        let txn = self.txn.lock().unwrap();
        let participants: Vec<&str> = txn
            .branches
            .iter()
            .map(|b| b.participant_id.as_str())
            .collect();
        tracing::info_span!("txn", run, txn_id = %txn.id, participants = %participants.join(","))
    }

    pub fn announced(&self) -> Outcome {
        self.progress.borrow().announced
    }
}

/// A transaction as a caller may be shown it: its record, and what has been announced of it
/// (a commit decision is not shown before it is durable; see [`Txn::shown_state`]).
#[derive(Clone, Debug)]
pub struct Shown {
    pub txn: Txn,
    pub announced: Outcome,
}

impl Shown {
    fn live(live: &Live) -> Shown {
        let announced = live.announced();
        Shown {
            txn: live.txn.lock().unwrap().clone(),
            announced,
        }
    }

    /// A logged transaction that is no longer live, as it stands for good.
    fn recorded(txn: Txn) -> Shown {
        let txn = txn.settle();
        Shown {
            announced: txn.state.outcome(),
            txn,
        }
    }

    /// The state a caller sees.
    pub fn state(&self) -> State {
        self.txn.shown_state(self.announced)
    }
}

/// The coordinator: begins transactions, enlists branches, and (in `commit.rs` and
/// `recovery.rs`) drives them to their decision. Generic over its durable log and over how it
/// reaches participants, so the same code runs on sled and gRPC in the binary and in memory in
/// the scenario tests.
pub struct Coordinator<L: Log, P: Participants = GrpcParticipants> {
    /// The stable id, in every PostgreSQL gid of ours.
    pub(super) id: String,
    /// The decision log: the only durable state.
    pub(super) log: L,
    /// Transactions from Begin until every branch has acknowledged phase 2.
    pub(super) live: Mutex<HashMap<TxnId, Arc<Live>>>,
    pub(super) limits: Limits,
    pub(super) participants: P,
    /// The log's participant registry, and what this process has seen of each.
    pub(super) registry: Registry,
    /// Shutting down: Begin is refused.
    draining: AtomicBool,
    /// By endpoint: one-phase transactions that retired, whose participants may delete their
    /// markers once the final records are durable (`commit.rs`, `run_one_phase`).
    pub(super) forgettable: Mutex<HashMap<String, Vec<TxnId>>>,
    /// The log's epoch: a client that chooses its own txn ids sends it (`epoch.rs`).
    epoch: u64,
    /// Sagas from submission until they are final (`sagas.rs`).
    pub(super) sagas: Mutex<HashMap<String, Arc<super::sagas::LiveSaga>>>,
}

pub use crate::process::clock::now_ms;

/// The longest free text a client may store in a record: a label, a reason, an operator.
pub const MAX_TEXT: usize = 1024;
/// The longest participant endpoint URL.
const MAX_ENDPOINT: usize = 512;
/// The longest participant instance id (a participant sends 32 hex digits).
const MAX_INSTANCE_ID: usize = 128;

/// Refuses a text field longer than `max` bytes, naming the field and the limit.
pub(super) fn bounded(field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::InvalidArgument(format!(
            "{field} is {} bytes; at most {max} are allowed",
            value.len()
        )));
    }
    Ok(())
}

impl<L: Log> Coordinator<L> {
    /// A coordinator that reaches its participants over gRPC.
    pub fn new(
        id: String,
        log: L,
        limits: Limits,
        tls: Tls,
        bearer: Bearer,
    ) -> Result<Arc<Self>, Error> {
        let participants = GrpcParticipants::new(
            id.clone(),
            log.marker_key(),
            Duration::from_secs(2),
            tls,
            bearer,
        );
        Coordinator::with_participants(id, log, participants, limits)
    }
}

impl<L: Log, P: Participants> Coordinator<L, P> {
    pub fn with_participants(
        id: String,
        log: L,
        participants: P,
        limits: Limits,
    ) -> Result<Arc<Self>, Error> {
        let registry = Registry::new(log.participants()?);
        let epoch = log.epoch();
        Ok(Arc::new(Coordinator {
            epoch,
            participants,
            id,
            log,
            live: Mutex::new(HashMap::new()),
            limits,
            registry,
            draining: AtomicBool::new(false),
            forgettable: Mutex::new(HashMap::new()),
            sagas: Mutex::new(HashMap::new()),
        }))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The epoch clients that choose their own txn ids must send (`epoch.rs`).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Stops new transactions; those in flight carry on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub(super) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// How many transactions are still in flight.
    pub fn live_count(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    pub(super) fn live(&self, id: TxnId) -> Option<Arc<Live>> {
        self.live.lock().unwrap().get(&id).cloned()
    }

    /// Writes a record. A log that cannot be written leaves the coordinator unable to keep its
    /// promises, so that is fatal, like a failed flush (see `flusher.rs`).
    pub(super) fn put(&self, txn: &Txn) {
        if let Err(e) = self.log.put(txn) {
            tracing::error!(txn_id = %txn.id, error = %e, "decision log write failed; stopping the coordinator");
            std::process::abort();
        }
    }

    pub(super) async fn sync(&self) {
        if let Err(e) = self.log.sync().await {
            tracing::error!(error = %e, "decision log flush failed; stopping the coordinator");
            std::process::abort();
        }
    }

    /// The transaction is final: record it and let it leave memory.
    pub(super) fn retire(&self, live: &Live, txn: &Txn) {
        self.put(txn);
        self.live.lock().unwrap().remove(&txn.id);
        live.progress.send_modify(|p| p.finished = true);
        tracing::debug!(txn_id = %txn.id, state = ?txn.state, "transaction finished");
    }

    pub fn begin(self: &Arc<Self>, timeout_ms: u32, label: String) -> Result<(TxnId, i64), Error> {
        self.begin_as(timeout_ms, label, String::new())
    }

    /// [`Coordinator::begin`] for the token named `begun_by`.
    pub fn begin_as(
        self: &Arc<Self>,
        timeout_ms: u32,
        label: String,
        begun_by: String,
    ) -> Result<(TxnId, i64), Error> {
        let timeout = self.admit(timeout_ms, &label)?;
        let id = TxnId::generate();
        let live = self.live.lock().unwrap();
        let (_, deadline) = self.make_live(live, id, timeout, label, begun_by);
        tracing::debug!(txn_id = %id, timeout_ms = timeout.as_millis() as u64, "begin");
        Ok((id, deadline))
    }

    /// The checks every new transaction passes, Begin's or a first enlistment's; returns its
    /// timeout.
    fn admit(&self, timeout_ms: u32, label: &str) -> Result<Duration, Error> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let timeout = match timeout_ms {
            0 => self.limits.default_timeout,
            ms => Duration::from_millis(ms.into()),
        };
        if timeout > self.limits.max_timeout {
            return Err(Error::InvalidArgument(format!(
                "timeout_ms {timeout_ms} is above this coordinator's maximum of {} ms",
                self.limits.max_timeout.as_millis()
            )));
        }
        bounded("label", label, MAX_TEXT)?;
        let live = self.live.lock().unwrap().len();
        if live >= self.limits.max_live {
            return Err(Error::ResourceExhausted(format!(
                "{live} transactions are live, this coordinator's limit (--max-live-transactions {}); retry once some finish",
                self.limits.max_live
            )));
        }
        Ok(timeout)
    }

    /// Makes `id` live (unless it is already: a concurrent first enlistment won), with a timer
    /// that aborts it at its deadline. Returns it and its deadline.
    fn make_live(
        self: &Arc<Self>,
        mut table: std::sync::MutexGuard<'_, HashMap<TxnId, Arc<Live>>>,
        id: TxnId,
        timeout: Duration,
        label: String,
        begun_by: String,
    ) -> (Arc<Live>, i64) {
        if let Some(existing) = table.get(&id) {
            let deadline = existing.txn.lock().unwrap().deadline_ms;
            return (Arc::clone(existing), deadline);
        }
        let created = now_ms();
        let deadline = created + timeout.as_millis() as i64;
        let mut txn = Txn::begin(id, label, created, deadline);
        txn.begun_by = begun_by;
        let live = Live::new(txn, Outcome::Pending);
        table.insert(id, Arc::clone(&live));
        drop(table);
        // Weak: a pending timer must not keep a stopped coordinator (and its log) alive.
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(this) = this.upgrade() {
                this.expire(id);
            }
        });
        (live, deadline)
    }

    /// The first enlistment of a transaction a client started itself creates it, if nothing
    /// says it existed before (`epoch.rs`).
    fn create(self: &Arc<Self>, id: TxnId, start: &Start) -> Result<Arc<Live>, Error> {
        let timeout = self.admit(start.timeout_ms, &start.label)?;
        let table = self.live.lock().unwrap();
        // Under the table's lock: a transaction retires by writing its final record and then
        // leaving the table, so one that is neither in the table nor in the log never was.
        if !table.contains_key(&id) {
            if self.log.get(id)?.is_some() {
                drop(table);
                return Err(self.not_live(id, "registering a branch"));
            }
            self.may_create(id, start.epoch)?;
        }
        let (live, _) = self.make_live(table, id, timeout, start.label.clone(), String::new());
        crate::failpoint!("coordinator::txn_created");
        tracing::debug!(txn_id = %id, timeout_ms = timeout.as_millis() as u64, "created by its first enlistment");
        Ok(live)
    }

    /// Whether an id the log does not hold, named with `epoch`, may become a transaction now.
    fn may_create(&self, id: TxnId, epoch: u64) -> Result<(), super::epoch::Refusal> {
        let window = super::epoch::window(self.limits.max_timeout, self.limits.retain_finished);
        super::epoch::admit(id, epoch, self.epoch, now_ms(), window)
    }

    /// Records a final outcome for an id nobody has enlisted in (a Commit naming participants,
    /// or an Abort with its epoch, of a transaction the client started itself), so that an
    /// enlistment still on its way finds it final instead of creating it: the answer given
    /// now stays the answer. Not forced: lost in a crash, the new epoch refuses the id anyway,
    /// and the same call answers the same again. False: it exists after all (an enlistment
    /// got in first); the caller answers from that.
    pub(super) fn settle_unknown(
        &self,
        id: TxnId,
        committed: bool,
        reason: &str,
    ) -> Result<bool, Error> {
        // Under the table's lock, as `create` checks: neither live nor logged means unknown.
        let table = self.live.lock().unwrap();
        if table.contains_key(&id) || self.log.get(id)?.is_some() {
            return Ok(false);
        }
        self.put(&Txn::settled_unknown(id, committed, reason, now_ms()));
        drop(table);
        tracing::debug!(txn_id = %id, committed, "settled before its first enlistment");
        Ok(true)
    }

    /// Enlists a participant in a live, active transaction. Returns its deadline.
    pub async fn register_branch(
        self: &Arc<Self>,
        id: TxnId,
        participant_id: &str,
        endpoint: &str,
        instance: &str,
        one_phase: bool,
    ) -> Result<i64, Error> {
        self.register(id, None, participant_id, endpoint, instance, one_phase)
            .await
    }

    /// [`Coordinator::register_branch`], creating the transaction if this is the first
    /// enlistment of one a client started itself (`start`).
    pub async fn register(
        self: &Arc<Self>,
        id: TxnId,
        start: Option<&Start>,
        participant_id: &str,
        endpoint: &str,
        instance: &str,
        one_phase: bool,
    ) -> Result<i64, Error> {
        crate::proto::names::check_participant_id(participant_id)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        bounded("endpoint", endpoint, MAX_ENDPOINT)?;
        bounded("instance_id", instance, MAX_INSTANCE_ID)?;
        if let Some(allowed) = &self.limits.allowed_participants
            && allowed.get(participant_id).map(String::as_str) != Some(endpoint)
        {
            return Err(Error::NotAllowed(format!(
                "participant {participant_id:?} at {endpoint} is not one this coordinator enlists (--allowed-participants)"
            )));
        }
        let uri: Result<tonic::transport::Uri, _> = endpoint.parse();
        if !matches!(
            uri.as_ref().map(|u| u.scheme_str()),
            Ok(Some("http" | "https"))
        ) {
            return Err(Error::InvalidArgument(format!(
                "endpoint {endpoint:?} is not a URL such as http://127.0.0.1:50061"
            )));
        }
        self.participants
            .check_endpoint(endpoint)
            .map_err(Error::EndpointRefused)?;
        let live = match (self.live(id), start) {
            (Some(live), _) => live,
            (None, Some(start)) => self.create(id, start)?,
            (None, None) => return Err(self.not_live(id, "registering a branch")),
        };
        let deadline = {
            let mut txn = live.txn.lock().unwrap();
            let enlisted = |t: &Txn| {
                t.branches
                    .iter()
                    .any(|b| b.participant_id == participant_id)
            };
            if txn.branches.len() >= self.limits.max_branches && !enlisted(&txn) {
                return Err(Error::ResourceExhausted(format!(
                    "transaction {id} already has {} branches, the limit (--max-branches {})",
                    txn.branches.len(),
                    self.limits.max_branches
                )));
            }
            if txn.register(participant_id, endpoint, instance, one_phase)? {
                // A hint for recovery. Not forced: a branch prepared before its coordinator
                // died is found by asking the enlisted participants (`recovery.rs`).
                self.put(&txn);
                tracing::debug!(txn_id = %id, participant_id, endpoint, "branch registered");
            }
            txn.deadline_ms
        };
        self.enlist(participant_id, endpoint, instance).await?;
        crate::failpoint!("coordinator::branch_registered");
        Ok(deadline)
    }

    /// Makes sure the participant is in the durable registry before it can prepare anything
    /// of ours, so a restarted coordinator knows to ask it about orphans. Rare: once per
    /// participant (and endpoint), so the forced write costs nothing in steady state.
    async fn enlist(
        &self,
        participant_id: &str,
        endpoint: &str,
        instance: &str,
    ) -> Result<(), Error> {
        if self
            .registry
            .registering(participant_id, endpoint, instance, now_ms())
        {
            return Ok(());
        }
        if self.log.enlist(participant_id, endpoint)? {
            tracing::info!(participant_id, endpoint, "participant enlisted");
        }
        // Even when another registration wrote the entry first: it may not be on disk yet, and
        // this reply must not go out before it is.
        self.sync().await;
        self.registry
            .enlisted(participant_id, endpoint, instance, now_ms());
        Ok(())
    }

    /// The error for a transaction that is not live: final, or unknown.
    fn not_live(&self, id: TxnId, action: &'static str) -> Error {
        match self.log.get(id) {
            Ok(Some(txn)) => Error::Txn(super::txn::TxnError::NotActive {
                id,
                state: txn.state,
                action,
            }),
            Ok(None) => Error::NotFound(id),
            Err(e) => Error::Log(e),
        }
    }

    pub fn get(&self, id: TxnId) -> Result<Shown, Error> {
        if let Some(live) = self.live(id) {
            return Ok(Shown::live(&live));
        }
        match self.log.get(id)? {
            Some(txn) => Ok(Shown::recorded(txn)),
            None => Err(Error::NotFound(id)),
        }
    }

    /// Newest first: live transactions, then finished ones from the log.
    pub fn list(&self, states: &[State], limit: usize) -> Result<Vec<Shown>, Error> {
        let wanted = |s: State| states.is_empty() || states.contains(&s);
        let live: Vec<Arc<Live>> = self.live.lock().unwrap().values().cloned().collect();
        // Filtered on the state as shown (a commit being flushed shows as preparing), before
        // anything is copied.
        let mut out: Vec<Shown> = live
            .iter()
            .filter_map(|l| {
                let announced = l.announced();
                let txn = l.txn.lock().unwrap();
                wanted(txn.shown_state(announced)).then(|| Shown {
                    txn: txn.clone(),
                    announced,
                })
            })
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.txn.id));
        out.truncate(limit);
        let live_ids: std::collections::HashSet<TxnId> =
            live.iter().map(|l| l.txn.lock().unwrap().id).collect();
        let logged = self.log.newest(limit - out.len(), &|t: &Txn| {
            !live_ids.contains(&t.id) && wanted(t.state.settled())
        })?;
        out.extend(logged.into_iter().map(Shown::recorded));
        Ok(out)
    }

    /// A participant holding a prepared branch asks what became of it. Presumed abort: a
    /// transaction with no commit record was aborted.
    pub fn query_outcome(&self, id: TxnId, owner: &str) -> Result<Outcome, Error> {
        // Presuming abort for another coordinator's transaction could undo its commit. (An
        // owner left empty: the caller vouches that the transaction is ours, as the contract says.)
        if !owner.is_empty() && owner != self.id() {
            return Err(Error::NotOurs {
                id,
                ours: self.id().to_string(),
                owner: owner.to_string(),
            });
        }
        if let Some(live) = self.live(id) {
            return Ok(live.announced());
        }
        Ok(match self.log.get(id)? {
            Some(txn) => txn.state.settled().outcome(),
            None => Outcome::Aborted,
        })
    }
}
