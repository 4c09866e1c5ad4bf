//! The workload: concurrent clients moving money between the databases through twopc, and the
//! record of every transaction they began and what they were told about it.
//!
//! A transfer picks two distinct databases a and b and an account in each, debits a, credits
//! b, and writes a ledger row with the txn id and the signed amount into each. About one in
//! seven also inserts a row into `poison` on b that breaks a deferred foreign key: it runs
//! fine, then fails PREPARE TRANSACTION, so b votes no while a is already prepared, and a's
//! branch gets ROLLBACK PREPARED.
//!
//! One in five moves money between the two hot accounts, so transfers cross in both orders over
//! the same rows of two databases: distributed deadlocks, broken by the coordinator's detector
//! (its victims abort with 40P01), while processes are being killed.
//!
//! About one in three is a local transfer instead: both accounts in one database, so the
//! transaction has a lone branch and commits in one phase; its ledger row has delta 0. Poison
//! there fails the one-phase COMMIT itself.
//!
//! With `--embedded` the databases are fronted by `ledger` services with the participant inside
//! them, and a transfer is what a service's caller writes: `transact`, a `Post` of the debit to
//! one ledger and of the credit to another (each service runs its own statements in the
//! ambient transaction's branch; the txn id is each entry's memo), and the poison, when there
//! is one, through the embedded participant's own Execute. A Post that would overdraw an
//! account fails and aborts the transfer.

use crate::system::{DATABASES, Deployment, Role, System};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tower_layer::Layer;
use twopc::client::propagation::{Propagate, PropagateLayer};
use twopc::client::{self as sdk, transact_with};
use twopc::process::auth::Bearer;
use twopc::process::leader_channel::LeaderChannel;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
use twopc::proto::{self, Outcome};
use twopc::testkit::bank::{self, ACCOUNTS, INITIAL_BALANCE};
pub use twopc::testkit::bank::{Seen, Transfer};

mod ledger_pb {
    tonic::include_proto!("ledger.v1");
}

use ledger_pb::ledger_client::LedgerClient;

/// The memo of the ledger service's opening entries; every other entry's memo is a txn id.
pub const OPENING_MEMO: &str = "opening";

/// Every database's tables, created directly, outside twopc.
pub const SCHEMA: &str = bank::SCHEMA;

/// With `--embedded`: the ledger service creates its own tables; the harness adds the poison.
pub const POISON_SCHEMA: &str = "
    CREATE TABLE poison_target (id int PRIMARY KEY);
    CREATE TABLE poison (ref int REFERENCES poison_target (id) DEFERRABLE INITIALLY DEFERRED);
";

/// Every RPC the clients make is bounded by this, on the wire (grpc-timeout) and locally.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Begin's timeout: a transaction still active after it is aborted by the coordinator.
const TXN_TIMEOUT_MS: u32 = 5000;
const POISON_PROBABILITY: f64 = 0.15;
const LOCAL_PROBABILITY: f64 = 0.3;
const HOT_PROBABILITY: f64 = 0.2;
/// Accounts 1 and 2 of every database.
const HOT_ACCOUNTS: i64 = 2;
/// How long a client waits after an error before its next transfer.
const ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How long stopping the workload may take (each transfer is a bounded number of RPCs).
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// Every transaction any client began, by id.
#[derive(Default)]
pub struct Recorder {
    txns: Mutex<HashMap<String, Transfer>>,
    round: AtomicUsize,
}

impl Recorder {
    pub fn set_round(&self, round: usize) {
        self.round.store(round, Ordering::SeqCst);
    }

    fn began(&self, id: &str, plan: &Plan, expect: Vec<(usize, i64, i64)>) {
        let record = Transfer {
            id: id.to_string(),
            dbs: [plan.a, plan.b],
            amount: plan.amount,
            poison: plan.poison,
            expect,
            seen: Seen::InFlight,
            round: self.round.load(Ordering::SeqCst),
            note: String::new(),
        };
        self.txns.lock().unwrap().insert(id.to_string(), record);
    }

    fn finish(&self, id: &str, seen: Seen, note: String) {
        if let Some(r) = self.txns.lock().unwrap().get_mut(id) {
            r.seen = seen;
            r.note = note;
        }
    }

    pub fn snapshot(&self) -> Vec<Transfer> {
        let mut all: Vec<Transfer> = self.txns.lock().unwrap().values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }
}

/// gRPC clients to every process, on lazily (re)connecting channels.
#[derive(Clone)]
pub struct Clients {
    /// Through every coordinator replica's URL with `--ha`: calls go to the leader.
    pub coordinator: CoordinatorClient<InterceptedService<LeaderChannel, Bearer>>,
    pub participants: Vec<ParticipantClient<Authed>>,
    /// With `--embedded`: the ledger services, called as a service's caller calls them.
    services: Option<Services>,
    /// The coordinator's epoch, for transactions whose id the workload chooses (0: ask).
    epoch: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Clone)]
struct Services {
    /// twopc's client library: `transact`, and the poison's Execute.
    sdk: sdk::Client,
    /// Each carries the ambient transaction along (`twopc-txn-id`).
    ledgers: Vec<LedgerClient<Propagate<Channel>>>,
    /// Where each ledger (and its embedded participant) serves.
    urls: Vec<String>,
}

/// A channel with the harness's token on every call.
type Authed = InterceptedService<Channel, Bearer>;

fn channel(sys: &System, role: Role) -> anyhow::Result<Authed> {
    let channel = sys
        .tls
        .endpoint(&sys.url(role))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(RPC_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(InterceptedService::new(channel, sys.bearer.clone()))
}

impl Clients {
    pub fn new(sys: &System) -> anyhow::Result<Clients> {
        let services = match sys.deployment {
            Deployment::Standalone => None,
            Deployment::Embedded => {
                let urls: Vec<String> = (0..DATABASES)
                    .map(|i| sys.url(Role::Participant(i)))
                    .collect();
                let ledgers = urls
                    .iter()
                    .map(|url| {
                        let channel = tonic::transport::Endpoint::from_shared(url.clone())?
                            .connect_timeout(Duration::from_secs(1))
                            .timeout(RPC_TIMEOUT)
                            .tcp_nodelay(true)
                            .connect_lazy();
                        Ok(LedgerClient::new(PropagateLayer.layer(channel)))
                    })
                    .collect::<anyhow::Result<_>>()?;
                Some(Services {
                    sdk: sdk::Client::connect(&sys.coordinator_urls())?,
                    ledgers,
                    urls,
                })
            }
        };
        Ok(Clients {
            coordinator: CoordinatorClient::new(InterceptedService::new(
                LeaderChannel::new(&sys.coordinator_urls(), &sys.tls)?,
                sys.bearer.clone(),
            )),
            participants: (0..DATABASES)
                .map(|i| Ok(ParticipantClient::new(channel(sys, Role::Participant(i))?)))
                .collect::<anyhow::Result<_>>()?,
            services,
            epoch: Arc::default(),
        })
    }

    /// The coordinator's epoch: cached; asked for when unknown.
    async fn epoch(&self) -> Result<u64, Status> {
        match self.epoch.load(Ordering::Relaxed) {
            0 => {
                let mut coordinator = self.coordinator.clone();
                let get = coordinator.get_epoch(request(proto::GetEpochRequest {}));
                let epoch = bounded(get).await?.epoch;
                self.epoch.store(epoch, Ordering::Relaxed);
                Ok(epoch)
            }
            epoch => Ok(epoch),
        }
    }

    /// A `stale epoch` refusal says which epoch to start the next transaction in.
    fn learn_epoch(&self, status: &Status) {
        if let Some(epoch) = status
            .metadata()
            .get(proto::EPOCH_METADATA)
            .and_then(|v| v.to_str().ok()?.parse().ok())
        {
            self.epoch.fetch_max(epoch, Ordering::Relaxed);
        }
    }

    /// Begins a transaction with a branch on database `db` (a read: nothing to check later).
    pub async fn enlisted_on(&self, db: usize) -> Result<String, Status> {
        let txn = bounded(self.coordinator.clone().begin(request(proto::BeginRequest {
            timeout_ms: TXN_TIMEOUT_MS,
            label: "crashtest: a rollback owed".into(),
        })))
        .await?
        .txn_id;
        bounded(
            self.participants[db]
                .clone()
                .execute(request(proto::ExecuteRequest {
                    txn_id: txn.clone(),
                    sql: "SELECT 1".into(),
                    params: vec![],
                    ..Default::default()
                })),
        )
        .await?;
        Ok(txn)
    }

    pub async fn abort(&self, txn: &str) -> Result<(), Status> {
        bounded(self.coordinator.clone().abort(request(proto::AbortRequest {
            txn_id: txn.into(),
            reason: "crashtest".into(),
            ..Default::default()
        })))
        .await
        .map(drop)
    }

    /// With `--embedded`: opens every account in every ledger with its initial balance, by
    /// Posts outside any global transaction (each commits on its own).
    pub async fn open_accounts(&self) -> anyhow::Result<()> {
        let Some(services) = &self.services else {
            return Ok(());
        };
        for (i, ledger) in services.ledgers.iter().enumerate() {
            for n in 1..=ACCOUNTS {
                bounded(ledger.clone().post(request(ledger_pb::PostRequest {
                    account: account(n),
                    amount: INITIAL_BALANCE,
                    memo: OPENING_MEMO.into(),
                })))
                .await
                .map_err(|s| {
                    anyhow::anyhow!("opening account {n} in p{}: {}", i + 1, describe(&s))
                })?;
            }
        }
        Ok(())
    }
}

/// A ledger service's name for account `n`.
fn account(n: i64) -> String {
    format!("a{n}")
}

/// A request with the client's deadline on the wire.
pub fn request<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.set_timeout(RPC_TIMEOUT);
    req
}

/// Bounds a call locally too, whatever the transport does.
pub async fn bounded<T>(
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(RPC_TIMEOUT + Duration::from_secs(1), call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(
            "no answer within the RPC timeout",
        )),
    }
}

fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Counters of one workload run.
#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    pub transfers: usize,
    pub begin_errors: usize,
}

/// One transfer, drawn at random: `amount` from account `from` of database `a` to account `to`
/// of database `b` (the same database for a local transfer).
struct Plan {
    a: usize,
    b: usize,
    local: bool,
    from: i64,
    to: i64,
    amount: i64,
    poison: bool,
}

/// Why a transfer through the services failed.
#[derive(Debug, thiserror::Error)]
enum Failed {
    /// A step of its work: the transaction was aborted and can never commit.
    #[error("{0}")]
    Step(String),
    /// Begin or Commit.
    #[error(transparent)]
    Txn(#[from] sdk::Error),
}

struct Client {
    clients: Clients,
    recorder: Arc<Recorder>,
    rng: StdRng,
    /// The share of transfers between the hot accounts.
    hot: f64,
}

impl Client {
    async fn exec(
        &self,
        db: usize,
        txn: &str,
        sql: &str,
        params: Vec<proto::Value>,
    ) -> Result<(), String> {
        let mut participant = self.clients.participants[db].clone();
        bounded(participant.execute(request(proto::ExecuteRequest {
            txn_id: txn.into(),
            sql: sql.into(),
            params,
            ..Default::default()
        })))
        .await
        .map(|_| ())
        .map_err(|s| format!("Execute on p{} ({sql}): {}", db + 1, describe(&s)))
    }

    /// Several statements in one Execute, for a transaction whose id the workload chose.
    async fn exec_batch(
        &self,
        db: usize,
        txn: &str,
        epoch: u64,
        statements: Vec<(&str, Vec<proto::Value>)>,
    ) -> Result<(), String> {
        let mut participant = self.clients.participants[db].clone();
        let what = statements
            .iter()
            .map(|(sql, _)| *sql)
            .collect::<Vec<_>>()
            .join("; ");
        bounded(
            participant.execute(request(proto::ExecuteRequest {
                txn_id: txn.into(),
                epoch,
                timeout_ms: TXN_TIMEOUT_MS,
                label: "crashtest: three calls".into(),
                statements: statements
                    .into_iter()
                    .map(|(sql, params)| proto::Statement {
                        sql: sql.into(),
                        params,
                    })
                    .collect(),
                ..Default::default()
            })),
        )
        .await
        .map(|_| ())
        .map_err(|s| {
            self.clients.learn_epoch(&s);
            format!("Execute on p{} ({what}): {}", db + 1, describe(&s))
        })
    }

    /// One transfer. Returns false if it hit an error (the caller pauses).
    async fn transfer(&mut self, stats: &mut Stats) -> bool {
        let plan = self.plan();
        match self.clients.services.clone() {
            None => self.through_participants(&plan, stats).await,
            Some(services) => self.through_services(&plan, &services, stats).await,
        }
    }

    fn plan(&mut self) -> Plan {
        let a = self.rng.random_range(0..DATABASES);
        let local = self.rng.random_bool(LOCAL_PROBABILITY);
        let b = if local {
            a
        } else {
            (a + self.rng.random_range(1..DATABASES)) % DATABASES
        };
        // Some transfers go between the hot accounts, in both directions across databases:
        // the distributed deadlocks the coordinator's detector breaks, during the crashes.
        let accounts = if self.rng.random_bool(self.hot) {
            HOT_ACCOUNTS
        } else {
            ACCOUNTS
        };
        let from = self.rng.random_range(1..=accounts);
        let to = self.rng.random_range(1..=accounts);
        let amount = self.rng.random_range(1..=100i64);
        let poison = self.rng.random_bool(POISON_PROBABILITY);
        Plan {
            a,
            b,
            local,
            from,
            to,
            amount,
            poison,
        }
    }

    async fn through_participants(&mut self, plan: &Plan, stats: &mut Stats) -> bool {
        let &Plan {
            a,
            b,
            local,
            from,
            to,
            amount,
            poison,
        } = plan;
        let mut coordinator = self.clients.coordinator.clone();
        // Half the transfers in three calls (docs/PROTOCOL.md §12): the id chosen here in the
        // coordinator's epoch, each participant's statements in one Execute, Commit naming
        // the participants (and answering at the decision half of the time); the other half
        // as before: Begin, an Execute per statement, Commit.
        let three_calls = self.rng.random_bool(0.5);
        let decided = three_calls && self.rng.random_bool(0.5);
        let (txn, epoch) = if three_calls {
            match self.clients.epoch().await {
                Ok(epoch) => (twopc::proto::TxnId::generate().to_string(), epoch),
                Err(_) => {
                    stats.begin_errors += 1;
                    return false;
                }
            }
        } else {
            let begun = bounded(coordinator.begin(request(proto::BeginRequest {
                timeout_ms: TXN_TIMEOUT_MS,
                label: "crashtest".into(),
            })))
            .await;
            match begun {
                Ok(r) => (r.txn_id, 0),
                Err(_) => {
                    stats.begin_errors += 1;
                    return false;
                }
            }
        };
        stats.transfers += 1;
        // One ledger row per database; a local transfer's debit and credit share one row of 0.
        let expect = if local {
            vec![(a, 1, 0)]
        } else {
            vec![(a, 1, -amount), (b, 1, amount)]
        };
        self.recorder.began(&txn, plan, expect);

        let debit = "UPDATE acct SET bal = bal - $1 WHERE id = $2";
        let credit = "UPDATE acct SET bal = bal + $1 WHERE id = $2";
        let entry = "INSERT INTO ledger VALUES ($1, $2)";
        let poisoned = "INSERT INTO poison VALUES (-1)";
        let steps = async {
            if three_calls {
                let v = proto::Value::int;
                let memo = || proto::Value::text(&txn);
                let mut on_a = vec![(debit, vec![v(amount), v(from)])];
                let mut on_b = vec![(credit, vec![v(amount), v(to)])];
                if local {
                    on_a.append(&mut on_b);
                    on_a.push((entry, vec![memo(), v(0)]));
                } else {
                    on_a.push((entry, vec![memo(), v(-amount)]));
                    on_b.push((entry, vec![memo(), v(amount)]));
                }
                let last = if local { &mut on_a } else { &mut on_b };
                if poison {
                    last.push((poisoned, vec![]));
                }
                self.exec_batch(a, &txn, epoch, on_a).await?;
                if !local {
                    self.exec_batch(b, &txn, epoch, on_b).await?;
                }
                return Ok::<_, String>(());
            }
            self.exec(
                a,
                &txn,
                debit,
                vec![proto::Value::int(amount), proto::Value::int(from)],
            )
            .await?;
            self.exec(
                b,
                &txn,
                credit,
                vec![proto::Value::int(amount), proto::Value::int(to)],
            )
            .await?;
            let deltas: &[(usize, i64)] = if local {
                &[(a, 0)]
            } else {
                &[(a, -amount), (b, amount)]
            };
            for &(db, delta) in deltas {
                self.exec(
                    db,
                    &txn,
                    entry,
                    vec![proto::Value::text(&txn), proto::Value::int(delta)],
                )
                .await?;
            }
            if poison {
                self.exec(b, &txn, poisoned, vec![]).await?;
            }
            Ok::<_, String>(())
        }
        .await;
        let participants = three_calls.then(|| proto::Participants {
            names: if local { vec![a] } else { vec![a, b] }
                .into_iter()
                .map(|db| format!("p{}", db + 1))
                .collect(),
        });
        let wait = match decided {
            true => proto::CommitWait::Decided,
            false => proto::CommitWait::Applied,
        };

        let (seen, note, ok) = match steps {
            Ok(()) => {
                let r = bounded(coordinator.commit(request(proto::CommitRequest {
                    txn_id: txn.clone(),
                    participants,
                    wait: wait as i32,
                })))
                .await;
                match r {
                    Ok(r) => match r.outcome() {
                        Outcome::Committed => (
                            Seen::Committed,
                            if r.branches_pending {
                                "Commit: COMMITTED, branches pending".into()
                            } else {
                                "Commit: COMMITTED".into()
                            },
                            true,
                        ),
                        Outcome::Aborted => (
                            Seen::Aborted,
                            format!("Commit: ABORTED ({})", r.reason),
                            true,
                        ),
                        other => (Seen::Unknown, format!("Commit answered {other:?}"), false),
                    },
                    Err(s) => (
                        Seen::Unknown,
                        format!("Commit failed: {}", describe(&s)),
                        false,
                    ),
                }
            }
            Err(failed) => {
                let r = bounded(coordinator.abort(request(proto::AbortRequest {
                    txn_id: txn.clone(),
                    reason: failed.chars().take(200).collect(),
                    epoch,
                })))
                .await;
                match r {
                    Ok(r) => match r.outcome() {
                        Outcome::Aborted => {
                            (Seen::Aborted, format!("{failed}; Abort: ABORTED"), false)
                        }
                        Outcome::Committed => (
                            Seen::Committed,
                            format!("{failed}; Abort: COMMITTED"),
                            false,
                        ),
                        other => (
                            Seen::Unknown,
                            format!("{failed}; Abort answered {other:?}"),
                            false,
                        ),
                    },
                    Err(s) => (
                        Seen::Unknown,
                        format!("{failed}; Abort failed: {}", describe(&s)),
                        false,
                    ),
                }
            }
        };
        self.recorder.finish(&txn, seen, note);
        ok
    }

    /// The transfer as a service's caller writes it: `transact` around a Post to each ledger.
    async fn through_services(
        &mut self,
        plan: &Plan,
        services: &Services,
        stats: &mut Stats,
    ) -> bool {
        let options = sdk::Options {
            timeout: Some(Duration::from_millis(TXN_TIMEOUT_MS.into())),
            label: "crashtest".into(),
            deadlock_retries: 0,
        };
        let mut began: Option<String> = None;
        let outcome = transact_with(&services.sdk, options, |tx| {
            let id = tx.id().to_string();
            // Each entry of one Post; a local transfer posts both to one ledger.
            let expect = if plan.local {
                vec![(plan.a, 2, 0)]
            } else {
                vec![(plan.a, 1, -plan.amount), (plan.b, 1, plan.amount)]
            };
            self.recorder.began(&id, plan, expect);
            began = Some(id.clone());
            let post = move |db: usize, n: i64, amount: i64, memo: String| {
                let mut ledger = services.ledgers[db].clone();
                async move {
                    let req = ledger_pb::PostRequest {
                        account: account(n),
                        amount,
                        memo,
                    };
                    bounded(ledger.post(request(req)))
                        .await
                        .map(|_| ())
                        .map_err(|s| {
                            Failed::Step(format!(
                                "Post {amount:+} to p{}: {}",
                                db + 1,
                                describe(&s)
                            ))
                        })
                }
            };
            async move {
                post(plan.a, plan.from, -plan.amount, id.clone()).await?;
                post(plan.b, plan.to, plan.amount, id).await?;
                if plan.poison {
                    // Two statements in one Execute: `participant::between_statements` fires.
                    let statements: [(&str, &[&(dyn sdk::ToValue + Sync)]); 2] =
                        [("SELECT 1", &[]), ("INSERT INTO poison VALUES (-1)", &[])];
                    tx.execute_batch(&services.urls[plan.b], &statements)
                        .await
                        .map_err(|e| Failed::Step(format!("poison on p{}: {e}", plan.b + 1)))?;
                }
                Ok::<_, Failed>(())
            }
        });
        let outcome = tokio::time::timeout(3 * RPC_TIMEOUT, outcome)
            .await
            .unwrap_or_else(|_| {
                Err(Failed::Txn(sdk::Error::Rpc {
                    code: tonic::Code::DeadlineExceeded,
                    message: format!("no outcome within {:?}", 3 * RPC_TIMEOUT),
                }))
            });
        let Some(id) = began else {
            stats.begin_errors += 1;
            return false;
        };
        stats.transfers += 1;
        let (seen, note, ok) = match outcome {
            Ok(()) => (Seen::Committed, "transact: committed".into(), true),
            Err(Failed::Txn(sdk::Error::Aborted { reason, .. })) => {
                (Seen::Aborted, format!("transact: aborted ({reason})"), true)
            }
            // Nobody commits a transaction whose work failed: it aborts, by transact's Abort
            // or by its deadline.
            Err(Failed::Step(step)) => (Seen::Aborted, step, false),
            Err(Failed::Txn(e)) => (Seen::Unknown, format!("Commit: {e}"), false),
        };
        self.recorder.finish(&id, seen, note);
        ok
    }
}

/// Clients running until stopped.
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Stats>>,
}

impl Workload {
    /// `n` clients; `hot`: the share of their transfers between the hot accounts (`None`:
    /// the usual one in five).
    pub fn start(
        clients: &Clients,
        recorder: &Arc<Recorder>,
        n: usize,
        seed: u64,
        hot: Option<f64>,
    ) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..n)
            .map(|i| {
                let mut client = Client {
                    clients: clients.clone(),
                    recorder: Arc::clone(recorder),
                    rng: StdRng::seed_from_u64(seed.wrapping_add(i as u64)),
                    hot: hot.unwrap_or(HOT_PROBABILITY),
                };
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut stats = Stats::default();
                    while !stop.load(Ordering::SeqCst) {
                        if !client.transfer(&mut stats).await {
                            tokio::time::sleep(ERROR_PAUSE).await;
                        }
                    }
                    stats
                })
            })
            .collect();
        Workload { stop, tasks }
    }

    /// Stops the clients after their current transfer and waits for them.
    pub async fn stop(self) -> Stats {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = Stats::default();
        let until = tokio::time::Instant::now() + STOP_TIMEOUT;
        for task in self.tasks {
            let abort = task.abort_handle();
            match tokio::time::timeout_at(until, task).await {
                Ok(Ok(s)) => {
                    total.transfers += s.transfers;
                    total.begin_errors += s.begin_errors;
                }
                Ok(Err(e)) => eprintln!("crashtest: a workload client failed: {e}"),
                Err(_) => {
                    eprintln!("crashtest: a workload client did not stop in time; aborting it");
                    abort.abort();
                }
            }
        }
        total
    }
}
