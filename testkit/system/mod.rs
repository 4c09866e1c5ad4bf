//! A whole twopc system on this machine, from one builder: throwaway PostgreSQL clusters, a
//! coordinator, and a participant per database, served on the caller's runtime on loopback,
//! optionally with mutual TLS on every connection and a token on every call, or with the
//! coordinator's log on etcd. Torn down on drop, also when a test panics.
//!
//! ```no_run
//! # async fn scene() -> anyhow::Result<()> {
//! use twopc::testkit::{bank, system::System};
//! let sys = System::builder().databases(2).schema(bank::SCHEMA).start().await?;
//! let moved = bank::transfer(&sys, (0, 1), (1, 2), 10).await;
//! assert!(bank::check(&sys, &[moved]).await.is_empty());
//! # Ok(()) }
//! ```
//!
//! The scenario conveniences on [`System`] (`begin`, `exec`, `commit`, ...) panic on what a
//! test would call a failure, as test helpers do; assembling the system returns errors, for
//! the tools that build on it. A server as a process of its own is [`Proc`].

pub mod process;
pub mod replicas;
pub mod server;

pub use process::{Proc, Started, is_abort, listen};
pub use replicas::{ReplicaSet, Replicas};
pub use server::{Server, listener, rebind};

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::wait::{self, Health};
use super::{EtcdCluster, PgCluster, Settings, TestPki, TestTokens};
use crate::coordinator::{self, Limits};
use crate::participant;
use crate::process::auth::{Auth, Bearer};
use crate::process::tls::Tls;
use crate::proto;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::participant_client::ParticipantClient;

/// A client of the system's servers, with the system's client token on every call.
pub type Client = InterceptedService<Channel, Bearer>;

/// Limits for scenarios: short enough that a deadline scenario runs in seconds.
pub fn test_limits() -> Limits {
    Limits {
        prepare_timeout: Duration::from_secs(5),
        commit_wait: Duration::from_secs(2),
        health_check_interval: Some(Duration::from_millis(200)),
        ..Limits::default()
    }
}

/// The process names certificates are issued to and participants are registered as.
fn participant_id(names: &[String], i: usize) -> String {
    names
        .get(i)
        .cloned()
        .unwrap_or_else(|| format!("p{}", i + 1))
}

/// The TLS and token settings of the process `name`: plaintext, everyone admitted, without a
/// PKI and tokens.
fn security(pki: &Option<TestPki>, tokens: &Option<TestTokens>, name: &str) -> Result<(Tls, Auth)> {
    Ok(match (pki, tokens) {
        (Some(pki), Some(tokens)) => (pki.tls(name)?, tokens.auth()?),
        _ => Default::default(),
    })
}

/// A change to a participant's configuration after the defaults.
type ParticipantChange = Box<dyn Fn(participant::Config) -> participant::Config + Send + Sync>;

/// What to start; [`System::builder`].
pub struct Builder {
    /// Clusters to start, when none are given.
    databases: usize,
    /// The settings of the clusters it starts.
    settings: Settings,
    /// Clusters to use instead of starting any (shared with the caller).
    clusters: Option<Vec<Arc<PgCluster>>>,
    /// The participants' ids, in database order; p1, p2, ... for the rest.
    names: Vec<String>,
    /// SQL run on every database before any server starts.
    schema: Option<String>,
    limits: Limits,
    secure: bool,
    /// The coordinator's stable id.
    id: String,
    /// With etcd: the coordinator's log on it (prefix `/twopc/<id>/`), and the start waits
    /// until it leads.
    etcd: Option<Vec<String>>,
    /// Changes every participant's configuration after the defaults.
    participant: Option<ParticipantChange>,
    /// Starts a participant per database (not when services that embed one front them).
    participants: bool,
}

impl Builder {
    /// Starts `n` clusters, one participant each (default 2).
    pub fn databases(mut self, n: usize) -> Builder {
        self.databases = n;
        self
    }

    /// The settings of the clusters it starts.
    pub fn settings(mut self, settings: Settings) -> Builder {
        self.settings = settings;
        self
    }

    /// Fronts these clusters instead of starting new ones.
    pub fn on(mut self, clusters: Vec<Arc<PgCluster>>) -> Builder {
        self.clusters = Some(clusters);
        self
    }

    /// Names the participants (and their certificates), in database order.
    pub fn names(mut self, names: &[&str]) -> Builder {
        self.names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// Runs `sql` on every database before the servers start.
    pub fn schema(mut self, sql: &str) -> Builder {
        self.schema = Some(sql.into());
        self
    }

    pub fn limits(mut self, limits: Limits) -> Builder {
        self.limits = limits;
        self
    }

    /// Mutual TLS on every connection, a certificate per process, and a bearer token of the
    /// right role on every call.
    pub fn secure(mut self, on: bool) -> Builder {
        self.secure = on;
        self
    }

    /// The coordinator's stable id (default `test-coord`).
    pub fn id(mut self, id: &str) -> Builder {
        self.id = id.into();
        self
    }

    /// The coordinator's log on this etcd cluster instead of sled.
    pub fn etcd(mut self, etcd: &EtcdCluster) -> Builder {
        self.etcd = Some(etcd.endpoints());
        self
    }

    /// Changes every participant's configuration (its pool, its resolver, ...).
    pub fn participant(
        mut self,
        change: impl Fn(participant::Config) -> participant::Config + Send + Sync + 'static,
    ) -> Builder {
        self.participant = Some(Box::new(change));
        self
    }

    /// Starts no participant: the databases are fronted by services that embed one (the
    /// caller starts them, pointed at [`System::coordinator_url`]).
    pub fn no_participants(mut self) -> Builder {
        self.participants = false;
        self
    }

    /// Starts it all: the clusters (with the schema), the coordinator, then the participants.
    pub async fn start(self) -> Result<System> {
        let pgs = match self.clusters {
            Some(pgs) => {
                if let Some(schema) = &self.schema {
                    for pg in &pgs {
                        pg.client().await?.batch_execute(schema).await?;
                    }
                }
                pgs
            }
            None => {
                PgCluster::start_many(self.databases, self.settings, self.schema.as_deref()).await?
            }
        };
        let (pki, tokens) = match self.secure {
            true => (Some(TestPki::new()?), Some(TestTokens::new()?)),
            false => (None, None),
        };
        let data_dir = tempfile::Builder::new()
            .prefix("twopc-coord-")
            .tempdir()
            .context("making the coordinator's data dir")?;
        let (tls, auth) = security(&pki, &tokens, "coordinator")?;
        let scheme = tls.scheme();
        let (l, caddr) = listener().await?;
        let etcd = self.etcd.map(|endpoints| coordinator::EtcdConfig {
            endpoints,
            prefix: format!("/twopc/{}/", self.id),
            lease_ttl: Duration::from_secs(2),
            advertise: format!("{scheme}://{caddr}"),
            tls: Tls::default(),
            user: None,
        });
        let on_etcd = etcd.is_some();
        let coordinator = Server::coordinator(
            l,
            coordinator::Config {
                data_dir: data_dir.path().to_path_buf(),
                etcd,
                id: Some(self.id.clone()),
                limits: self.limits.clone(),
                drain_timeout: Duration::from_secs(2),
                tls: tls.clone(),
                auth,
            },
        )?;
        if on_etcd {
            // A replica serves at once, as a standby: the system is up once it leads.
            let url = format!("{scheme}://{caddr}");
            wait::until_serving(&tls, &url, Health::Leads, Duration::from_secs(20)).await?;
        }
        let mut system = System {
            participants: Vec::new(),
            coordinator,
            pgs,
            limits: self.limits,
            names: self.names,
            participant_change: self.participant,
            data_dir,
            client_tls: match &pki {
                Some(pki) => pki.tls("client")?,
                None => Tls::default(),
            },
            client_bearer: Bearer::new(tokens.as_ref().map(|t| t.client.as_str())),
            pki,
            tokens,
        };
        if self.participants {
            for i in 0..system.pgs.len() {
                let (l, _) = listener().await?;
                let config = system.participant_config(i)?;
                system.participants.push(Server::participant(l, config)?);
            }
        }
        Ok(system)
    }
}

pub struct System {
    /// Before the clusters, so the servers stop before the databases do.
    pub participants: Vec<Server>,
    pub coordinator: Server,
    /// The databases, in participant order.
    pub pgs: Vec<Arc<PgCluster>>,
    /// The coordinator's limits.
    pub limits: Limits,
    /// The participants' ids given to the builder.
    names: Vec<String>,
    /// The builder's change to every participant's configuration.
    participant_change: Option<ParticipantChange>,
    /// The coordinator's decision log, removed on drop.
    data_dir: tempfile::TempDir,
    /// Secure: the CA every process's certificate comes from.
    pub pki: Option<TestPki>,
    /// Secure: the tokens every server admits.
    pub tokens: Option<TestTokens>,
    /// How this system's own clients dial (as "client", with TLS when secure).
    pub client_tls: Tls,
    /// What this system's own clients send (the client token when secure).
    pub client_bearer: Bearer,
}

impl System {
    pub fn builder() -> Builder {
        Builder {
            databases: 2,
            settings: Settings::default(),
            clusters: None,
            names: Vec::new(),
            schema: None,
            limits: test_limits(),
            secure: false,
            id: "test-coord".into(),
            etcd: None,
            participant: None,
            participants: true,
        }
    }

    /// `n` databases with [`test_limits`]; panics if it cannot start (for tests).
    pub async fn start(n: usize) -> System {
        Self::builder()
            .databases(n)
            .start()
            .await
            .expect("start a system")
    }

    /// `n` databases with these limits; panics if it cannot start (for tests).
    pub async fn start_with(n: usize, limits: Limits) -> System {
        Self::builder()
            .databases(n)
            .limits(limits)
            .start()
            .await
            .expect("start a system")
    }

    /// `n` databases, every connection over mutual TLS and every call with a token; panics if
    /// it cannot start (for tests).
    pub async fn start_secure(n: usize) -> System {
        Self::builder()
            .databases(n)
            .secure(true)
            .start()
            .await
            .expect("start a secure system")
    }

    /// The participant id of database `i`.
    pub fn participant_id(&self, i: usize) -> String {
        participant_id(&self.names, i)
    }

    /// Where the coordinator keeps its log (sled).
    pub fn data_dir(&self) -> &std::path::Path {
        self.data_dir.path()
    }

    /// The URL of a server of this system: https:// when secure.
    pub fn url(&self, addr: SocketAddr) -> String {
        format!("{}://{addr}", self.client_tls.scheme())
    }

    /// The coordinator's URL.
    pub fn coordinator_url(&self) -> String {
        self.url(self.coordinator.addr)
    }

    /// Participant `i`'s URL.
    pub fn participant_url(&self, i: usize) -> String {
        self.url(self.participants[i].addr)
    }

    /// A channel to `addr`, connected on first use.
    pub fn channel(&self, addr: SocketAddr) -> Channel {
        let url = self.url(addr);
        self.client_tls
            .endpoint(&url)
            .unwrap_or_else(|e| panic!("{url}: {e}"))
            .connect_lazy()
    }

    /// A channel to `addr`, connected now (panics if it cannot connect).
    pub async fn dial(&self, addr: SocketAddr) -> Channel {
        let url = self.url(addr);
        let endpoint = self.client_tls.endpoint(&url).unwrap();
        endpoint
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e:?}"))
    }

    pub async fn coordinator(&self) -> CoordinatorClient<Client> {
        let channel = self.dial(self.coordinator.addr).await;
        CoordinatorClient::with_interceptor(channel, self.client_bearer.clone())
    }

    pub async fn participant(&self, i: usize) -> ParticipantClient<Client> {
        let channel = self.dial(self.participants[i].addr).await;
        ParticipantClient::with_interceptor(channel, self.client_bearer.clone())
    }

    /// Participant `i`'s configuration: the scenario defaults (a pool of 40, the resolver every
    /// 2 s), this system's TLS and tokens, and the builder's change.
    fn participant_config(&self, i: usize) -> Result<participant::Config> {
        let id = self.participant_id(i);
        let (tls, auth) = security(&self.pki, &self.tokens, &id)?;
        let config = participant::Config {
            max_connections: 40,
            resolve_interval: Duration::from_secs(2),
            tls,
            auth,
            ..participant::Config::new(&id, self.coordinator_url(), self.pgs[i].conn_str())
        };
        Ok(match &self.participant_change {
            Some(change) => change(config),
            None => config,
        })
    }

    /// Starts participant `i` again on its address (after [`Server::kill`]).
    pub async fn restart_participant(&mut self, i: usize) {
        let addr = self.participants[i].addr;
        let config = self.participant_config(i).expect("participant config");
        let l = rebind(addr).await.unwrap();
        self.participants[i] = Server::participant(l, config).unwrap();
    }

    /// Stops every server gracefully, participants first, and waits for them.
    pub async fn shutdown(self) -> Result<()> {
        let System {
            participants,
            coordinator,
            ..
        } = self;
        for p in participants {
            p.shutdown().await?;
        }
        coordinator.shutdown().await
    }

    pub async fn begin(&self) -> String {
        self.begin_with(0).await
    }

    pub async fn begin_with(&self, timeout_ms: u32) -> String {
        self.coordinator()
            .await
            .begin(proto::BeginRequest {
                timeout_ms,
                label: "test".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .txn_id
    }

    /// Runs `sql` in `txn`'s branch on participant `i`.
    pub async fn exec(
        &self,
        i: usize,
        txn: &str,
        sql: &str,
        params: Vec<proto::Value>,
    ) -> Result<proto::ExecuteResponse, tonic::Status> {
        self.participant(i)
            .await
            .execute(proto::ExecuteRequest {
                txn_id: txn.into(),
                sql: sql.into(),
                params,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn commit(&self, txn: &str) -> proto::CommitResponse {
        self.coordinator()
            .await
            .commit(proto::CommitRequest {
                txn_id: txn.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn abort(&self, txn: &str) -> proto::AbortResponse {
        self.coordinator()
            .await
            .abort(proto::AbortRequest {
                txn_id: txn.into(),
                reason: "test".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn get(&self, txn: &str) -> proto::Transaction {
        self.coordinator()
            .await
            .get_transaction(proto::GetTransactionRequest { txn_id: txn.into() })
            .await
            .unwrap()
            .into_inner()
    }

    /// Runs SQL directly on database `i`, outside twopc, and returns the first column of the
    /// first row as an integer.
    pub async fn scalar(&self, i: usize, sql: &str) -> i64 {
        self.pgs[i].scalar(sql).await.unwrap()
    }

    /// Runs SQL directly on every database.
    pub async fn setup_sql(&self, sql: &str) {
        for pg in &self.pgs {
            pg.client().await.unwrap().batch_execute(sql).await.unwrap();
        }
    }

    /// Runs SQL directly on every database as the superuser.
    pub async fn admin_sql(&self, sql: &str) {
        for pg in &self.pgs {
            let admin = pg.admin_client().await.unwrap();
            admin.batch_execute(sql).await.unwrap();
        }
    }

    /// Every scenario ends here: no prepared transaction is left anywhere. Phase 2 may still
    /// be finishing in the background, so this waits a bounded time.
    pub async fn assert_nothing_prepared(&self) {
        for (i, pg) in self.pgs.iter().enumerate() {
            wait::eventually_within(
                &format!("database {i} has no prepared transaction"),
                Duration::from_secs(10),
                || async { pg.prepared().await.unwrap() == 0 },
            )
            .await;
        }
    }
}
