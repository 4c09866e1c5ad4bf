//! The Rust client: global transactions as a service uses them.
//!
//! - [`Client`]: a coordinator connection (with TLS and a token when the servers want them),
//!   and one connection per participant it reaches, made on first use and shared.
//! - [`Transaction`]: one global transaction. [`Transaction::execute`] runs a statement on a
//!   participant with typed parameters and rows ([`value`]); [`Transaction::commit`] answers
//!   with the outcome, an abort as [`Error::Aborted`]. The idempotent calls (Commit, Abort) are
//!   retried on transient errors; a transaction dropped unfinished is aborted in the background.
//! - [`transact`] ([`ambient`]): begin, or join the transaction already in the task's context,
//!   run the work, and commit on `Ok` / abort on `Err` or panic. Nested calls share one
//!   transaction; the outermost commits.
//! - [`saga`]: a saga's plan built step by step ([`saga::Saga`]), submitted, and waited for;
//!   [`barrier`]: a saga's gRPC step inside the service it calls, its work beside the step's
//!   barrier row in the service's own database.
//! - [`propagation`]: tower layers that carry the ambient transaction across gRPC calls in
//!   `twopc-txn-id` metadata, for any tonic client and server.
//!
//! ```no_run
//! # async fn example() -> Result<(), twopc::client::Error> {
//! use twopc::client::{Client, transact};
//!
//! let client = Client::connect("http://127.0.0.1:50051")?;
//! let east = "http://127.0.0.1:50061";
//! let west = "http://127.0.0.1:50062";
//! transact(&client, |tx| async move {
//!     tx.execute(east, "UPDATE acct SET bal = bal - $1 WHERE id = $2", &[&30i64, &1i64]).await?;
//!     tx.execute(west, "UPDATE acct SET bal = bal + $1 WHERE id = $2", &[&30i64, &1i64]).await?;
//!     Ok::<_, twopc::client::Error>(())
//! })
//! .await
//! # }
//! ```

pub mod ambient;
pub mod barrier;
mod error;
pub mod propagation;
pub mod saga;
pub mod value;

pub use ambient::{Options, transact, transact_with};
pub use error::Error;
pub use value::{FromValue, Rows, ToValue};

use crate::process::auth::Bearer;
use crate::process::backoff::Backoff;
use crate::process::leader_channel::LeaderChannel;
use crate::process::tls::Tls;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::participant_client::ParticipantClient;
use crate::proto::{self, EPOCH_METADATA, Outcome, PARTICIPANT_ID_METADATA, Start, TxnId};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Authed = InterceptedService<Channel, Bearer>;

/// How often, and how patiently, idempotent calls are retried on transient errors.
const RETRIES: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// A connection to a coordinator, and to the participants its transactions run statements on.
/// Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct Client {
    coordinator: CoordinatorClient<InterceptedService<LeaderChannel, Bearer>>,
    participants: Arc<Mutex<HashMap<String, ParticipantClient<Authed>>>>,
    /// The coordinator's epoch, learned at the first transaction (0: not yet) and again when
    /// an Execute is refused with `stale epoch` (docs/PROTOCOL.md §12).
    epoch: Arc<AtomicU64>,
    tls: Tls,
    bearer: Bearer,
}

impl Client {
    /// A client of the coordinator at `url` (or of its replicas, their URLs separated by
    /// commas: calls go to the leader), in plaintext and without a token. Connects on first use
    /// (and again after a failure), so this fails only on a malformed URL.
    pub fn connect(url: &str) -> Result<Client, Error> {
        Client::with_security(url, Tls::default(), None)
    }

    /// A client that dials with `tls` (https:// servers, with a client certificate for mTLS)
    /// and sends `token` as `authorization: Bearer …` on every call.
    pub fn with_security(url: &str, tls: Tls, token: Option<&str>) -> Result<Client, Error> {
        let bearer = Bearer::new(token);
        let channel =
            LeaderChannel::new(url, &tls).map_err(|e| Error::Invalid(format!("{url}: {e}")))?;
        Ok(Client {
            coordinator: CoordinatorClient::new(InterceptedService::new(channel, bearer.clone())),
            participants: Arc::default(),
            epoch: Arc::default(),
            tls,
            bearer,
        })
    }

    fn channel(tls: &Tls, url: &str) -> Result<Channel, Error> {
        Ok(tls
            .endpoint(url)
            .map_err(|e| Error::Invalid(format!("{url}: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .connect_lazy())
    }

    fn participant(&self, url: &str) -> Result<ParticipantClient<Authed>, Error> {
        let mut participants = self.participants.lock().unwrap();
        if let Some(p) = participants.get(url) {
            return Ok(p.clone());
        }
        let channel = Client::channel(&self.tls, url)?;
        let p = ParticipantClient::new(InterceptedService::new(channel, self.bearer.clone()));
        participants.insert(url.to_string(), p.clone());
        Ok(p)
    }

    /// Starts a global transaction that aborts if it is still open after `timeout` (`None`:
    /// the coordinator's default). `label` shows in `twopcctl list`. No call: the id is made
    /// here (a UUIDv7) and the transaction is created by its first statement's enlistment, in
    /// the coordinator's epoch, which the first transaction of a client asks for once.
    pub async fn begin(
        &self,
        timeout: Option<Duration>,
        label: &str,
    ) -> Result<Transaction, Error> {
        let timeout_ms = timeout.map_or(0, |t| {
            u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1)
        });
        let start = Start {
            epoch: self.epoch().await?,
            timeout_ms,
            label: label.to_string(),
        };
        Ok(Transaction::new(
            self.clone(),
            TxnId::generate(),
            Some(start),
            true,
        ))
    }

    /// The coordinator's epoch: cached, asked for once (GetEpoch is idempotent: retried).
    async fn epoch(&self) -> Result<u64, Error> {
        match self.epoch.load(Ordering::Relaxed) {
            0 => {
                let epoch = self
                    .retried(|| async {
                        self.coordinator
                            .clone()
                            .get_epoch(proto::GetEpochRequest {})
                            .await
                            .map(|r| r.into_inner().epoch)
                            .map_err(|s| Error::from_status(&s))
                    })
                    .await?;
                self.epoch.store(epoch, Ordering::Relaxed);
                Ok(epoch)
            }
            epoch => Ok(epoch),
        }
    }

    /// A transaction begun elsewhere (another service handed its id over): this handle runs
    /// statements in it, but dropping it aborts nothing; its owner commits or aborts it.
    /// `start`: what the owner sends with its statements (the epoch it chose the id in), when
    /// it chose the id itself; `None` for a transaction from Begin.
    pub fn join(&self, id: TxnId, start: Option<Start>) -> Transaction {
        Transaction::new(self.clone(), id, start, false)
    }

    /// A `stale epoch` refusal carries the coordinator's current epoch, and so do Commit's and
    /// Abort's answers: the next transaction starts in it (a refused one cannot: its first
    /// branch may have been forgotten).
    fn learn_epoch(&self, status: &tonic::Status) {
        self.learn_epoch_from(status.metadata());
    }

    fn learn_epoch_from(&self, metadata: &tonic::metadata::MetadataMap) {
        if let Some(epoch) = metadata
            .get(EPOCH_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            self.epoch.fetch_max(epoch, Ordering::Relaxed);
        }
    }

    /// Retries `call` while it fails transiently, with backoff: only for idempotent calls.
    async fn retried<T, F, Fut>(&self, mut call: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut backoff = Backoff::new(FIRST_BACKOFF, FIRST_BACKOFF * 2u32.pow(RETRIES));
        loop {
            match call().await {
                Err(e) if e.is_transient() && backoff.waits() + 1 < RETRIES => {
                    tracing::debug!(error = %e, attempt = backoff.waits() + 1, "retrying");
                    backoff.wait().await;
                }
                result => return result,
            }
        }
    }
}

/// How a Commit ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Committed, but some participant has not acknowledged yet: its data becomes visible
    /// there once it does (the coordinator keeps at it).
    pub branches_pending: bool,
}

/// One global transaction. Clones are handles on the same transaction (the ambient context
/// hands them out); the last handle of one this process began aborts it if nobody ended it.
#[derive(Clone)]
pub struct Transaction {
    inner: Arc<Inner>,
}

struct Inner {
    id: TxnId,
    client: Client,
    /// Sent with every statement when the id was chosen by a client (the first enlistment
    /// creates the transaction); `None` for a transaction from Begin.
    start: Option<Start>,
    /// Begun here: this process ends it, and aborts it when dropped open.
    owned: bool,
    ended: Mutex<bool>,
    /// Every participant this handle (and the services it called, `propagation`) sent a
    /// statement to, whatever the answer: what Commit names.
    named: Mutex<BTreeSet<String>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.owned || *self.ended.lock().unwrap() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(txn_id = %self.id, "a transaction was dropped open outside a runtime: its deadline will abort it");
            return;
        };
        let (client, id, start) = (self.client.clone(), self.id, self.start.clone());
        tracing::debug!(txn_id = %id, "dropped without commit: aborting");
        runtime.spawn(async move {
            let why = "dropped by the client without commit";
            let _ = abort(&client, id, start.as_ref(), why).await;
        });
    }
}

impl Transaction {
    fn new(client: Client, id: TxnId, start: Option<Start>, owned: bool) -> Transaction {
        Transaction {
            inner: Arc::new(Inner {
                id,
                client,
                start,
                owned,
                ended: Mutex::new(false),
                named: Mutex::default(),
            }),
        }
    }

    /// What this transaction's statements carry so the first enlistment can create it.
    pub fn start(&self) -> Option<&Start> {
        self.inner.start.as_ref()
    }

    /// The participants sent statements so far (by id, or by URL where no answer came).
    pub fn participants(&self) -> Vec<String> {
        self.inner.named.lock().unwrap().iter().cloned().collect()
    }

    /// Adds participants that statements of this transaction went to elsewhere (a service it
    /// called, `propagation`), so Commit names them too.
    pub fn add_participants<I: IntoIterator<Item = String>>(&self, names: I) {
        self.inner.named.lock().unwrap().extend(names);
    }

    pub fn id(&self) -> TxnId {
        self.inner.id
    }

    /// The client this transaction runs on.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Runs `sql` with `params` ($1, $2, ...) in this transaction's branch on the participant
    /// at `participant` (its URL). Not retried: a statement is not idempotent. A failed
    /// statement dooms the transaction.
    pub async fn execute(
        &self,
        participant: &str,
        sql: &str,
        params: &[&(dyn ToValue + Sync)],
    ) -> Result<Rows, Error> {
        let resp = self
            .send(participant, |req| {
                req.sql = sql.to_string();
                req.params = params.iter().map(|p| p.to_value()).collect();
            })
            .await?;
        Ok(Rows {
            affected: resp.rows_affected,
            columns: resp.columns,
            rows: resp.rows.into_iter().map(|r| r.values).collect(),
        })
    }

    /// Runs several statements in one call, in order, each with its parameters: their rows,
    /// one [`Rows`] each. The first that fails stops the rest, and dooms the transaction.
    pub async fn execute_batch(
        &self,
        participant: &str,
        statements: &[(&str, &[&(dyn ToValue + Sync)])],
    ) -> Result<Vec<Rows>, Error> {
        let resp = self
            .send(participant, |req| {
                req.statements = statements
                    .iter()
                    .map(|(sql, params)| proto::Statement {
                        sql: sql.to_string(),
                        params: params.iter().map(|p| p.to_value()).collect(),
                    })
                    .collect();
            })
            .await?;
        Ok(resp
            .results
            .into_iter()
            .map(|r| Rows {
                affected: r.rows_affected,
                columns: r.columns,
                rows: r.rows.into_iter().map(|r| r.values).collect(),
            })
            .collect())
    }

    /// One Execute of this transaction on `participant`, its statements filled in by `fill`.
    async fn send(
        &self,
        participant: &str,
        fill: impl FnOnce(&mut proto::ExecuteRequest),
    ) -> Result<proto::ExecuteResponse, Error> {
        let start = self.inner.start.as_ref();
        let mut req = proto::ExecuteRequest {
            txn_id: self.inner.id.to_string(),
            epoch: start.map_or(0, |s| s.epoch),
            timeout_ms: start.map_or(0, |s| s.timeout_ms),
            label: start.map(|s| s.label.clone()).unwrap_or_default(),
            ..Default::default()
        };
        fill(&mut req);
        let answer = self
            .inner
            .client
            .participant(participant)?
            .execute(req)
            .await;
        // Named whatever the answer: a statement that may have enlisted must be accounted for.
        let named = match &answer {
            Ok(resp) => Some(resp.get_ref().participant_id.clone()),
            Err(status) => status
                .metadata()
                .get(PARTICIPANT_ID_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        };
        let named = named
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| participant.to_string());
        self.add_participants([named]);
        answer.map(tonic::Response::into_inner).map_err(|s| {
            self.inner.client.learn_epoch(&s);
            Error::from_status(&s)
        })
    }

    /// Commits: `Ok` once the decision is durable, [`Error::Aborted`] if the transaction
    /// aborted instead. Retried while the coordinator cannot be reached (Commit is
    /// idempotent); an [`Error::Rpc`] after that means the outcome is not known here yet.
    pub async fn commit(&self) -> Result<Committed, Error> {
        self.commit_waiting(proto::CommitWait::Applied).await
    }

    /// [`Transaction::commit`], answered once the decision is durable: phase 2 goes on, so
    /// another connection may still read the old rows for a moment (docs/PROTOCOL.md §12).
    pub async fn commit_decided(&self) -> Result<Committed, Error> {
        self.commit_waiting(proto::CommitWait::Decided).await
    }

    async fn commit_waiting(&self, wait: proto::CommitWait) -> Result<Committed, Error> {
        let (client, id) = (&self.inner.client, self.inner.id);
        // A transaction from Begin may have had statements from clients that do not report
        // them (an older SDK, a hand-written service): only our own are checked.
        let participants = self.inner.start.is_some().then(|| proto::Participants {
            names: self.participants(),
        });
        let resp = client
            .retried(|| async {
                client
                    .coordinator
                    .clone()
                    .commit(proto::CommitRequest {
                        txn_id: id.to_string(),
                        participants: participants.clone(),
                        wait: wait as i32,
                    })
                    .await
                    .map(|r| {
                        client.learn_epoch_from(r.metadata());
                        r.into_inner()
                    })
                    .map_err(|s| Error::from_status(&s))
            })
            .await?;
        *self.inner.ended.lock().unwrap() = true;
        match resp.outcome() {
            Outcome::Committed => Ok(Committed {
                branches_pending: resp.branches_pending,
            }),
            Outcome::Aborted => Err(Error::Aborted {
                sqlstate: error::sqlstate_in(&resp.reason),
                reason: resp.reason,
            }),
            other => Err(Error::Rpc {
                code: tonic::Code::Unavailable,
                message: format!("the coordinator answered Commit with {other:?}; ask again"),
            }),
        }
    }

    /// Aborts (unless it is already decided; then nothing changes). Retried like Commit.
    pub async fn abort(&self, reason: &str) -> Result<(), Error> {
        let inner = &self.inner;
        abort(&inner.client, inner.id, inner.start.as_ref(), reason).await?;
        *inner.ended.lock().unwrap() = true;
        Ok(())
    }
}

/// Aborts `id`; with `start`, also one the coordinator has not seen yet, so that no statement
/// still on its way can create it.
async fn abort(
    client: &Client,
    id: TxnId,
    start: Option<&Start>,
    reason: &str,
) -> Result<Outcome, Error> {
    client
        .retried(|| async {
            client
                .coordinator
                .clone()
                .abort(proto::AbortRequest {
                    txn_id: id.to_string(),
                    reason: reason.to_string(),
                    epoch: start.map_or(0, |s| s.epoch),
                })
                .await
                .map(|r| {
                    client.learn_epoch_from(r.metadata());
                    r.into_inner().outcome()
                })
                .map_err(|s| Error::from_status(&s))
        })
        .await
}
