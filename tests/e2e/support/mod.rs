//! Test support: a whole twopc system on this machine, torn down on drop.
//!
//! [`System::start`] makes `n` throwaway PostgreSQL clusters (real servers, see
//! `demo/cluster.rs`), a coordinator on a temp data dir, and one participant per cluster, all
//! served in-process on `127.0.0.1:0`; [`System::start_secure`] the same with mutual TLS on
//! every connection and bearer tokens on every call. Dropping the system (also when a test panics) stops the servers with the test's
//! runtime and the clusters with their guards.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use twopc::coordinator::{self, Limits};
use twopc::participant;
use twopc::process::auth::{Auth, Bearer};
use twopc::process::tls::Tls;
use twopc::proto;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
#[allow(unused_imports)] // each test binary uses its own part
pub use twopc::testkit::{PgCluster, Settings, TestPki, TestTokens};

pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Stops it the way a crash would: connections cut, nothing drained.
    pub fn kill(&self) {
        self.task.abort();
    }

    /// Stops it gracefully and waits.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await?
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct System {
    pub pgs: Vec<PgCluster>,
    pub coordinator: Server,
    pub participants: Vec<Server>,
    pub limits: Limits,
    data_dir: tempfile::TempDir,
    /// Secure: the CA every process's certificate comes from.
    pub pki: Option<TestPki>,
    /// Secure: the tokens every server admits.
    pub tokens: Option<TestTokens>,
    /// How the test's own clients dial (as "client", with TLS).
    pub client_tls: Tls,
    /// What the test's own clients send (the client token).
    pub client_bearer: Bearer,
}

/// A client of the system's servers, with the test's token on every call.
pub type Client = InterceptedService<Channel, Bearer>;

pub async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// Test limits: short enough that deadline scenarios run in seconds.
pub fn test_limits() -> Limits {
    Limits {
        prepare_timeout: Duration::from_secs(5),
        commit_wait: Duration::from_secs(2),
        health_check_interval: Some(Duration::from_millis(200)),
        ..Limits::default()
    }
}

impl System {
    pub async fn start(n: usize) -> System {
        Self::start_with(n, test_limits()).await
    }

    pub async fn start_with(n: usize, limits: Limits) -> System {
        Self::start_full(n, limits, None, None).await
    }

    /// Every connection over mutual TLS, each process with a certificate of its own, and
    /// every call with a bearer token of the right role.
    pub async fn start_secure(n: usize) -> System {
        let (pki, tokens) = (TestPki::new().unwrap(), TestTokens::new().unwrap());
        Self::start_full(n, test_limits(), Some(pki), Some(tokens)).await
    }

    /// The TLS settings of the process `name`: plaintext without a PKI.
    fn tls_of(pki: &Option<TestPki>, name: &str) -> Tls {
        pki.as_ref()
            .map(|p| p.tls(name).unwrap())
            .unwrap_or_default()
    }

    /// A server's auth settings: everyone admitted without tokens.
    fn auth_of(tokens: &Option<TestTokens>) -> Auth {
        tokens
            .as_ref()
            .map(|t| t.auth().unwrap())
            .unwrap_or_default()
    }

    async fn start_full(
        n: usize,
        limits: Limits,
        pki: Option<TestPki>,
        tokens: Option<TestTokens>,
    ) -> System {
        let pgs: Vec<PgCluster> = tokio::task::spawn_blocking(move || {
            (0..n)
                .map(|_| PgCluster::start().expect("start PostgreSQL"))
                .collect()
        })
        .await
        .unwrap();
        let data_dir = tempfile::Builder::new()
            .prefix("twopc-coord-")
            .tempdir()
            .unwrap();
        let coordinator = start_coordinator_with(
            data_dir.path(),
            limits.clone(),
            Self::tls_of(&pki, "coordinator"),
            Self::auth_of(&tokens),
        )
        .await;
        let mut participants = Vec::new();
        for (i, pg) in pgs.iter().enumerate() {
            let id = format!("p{}", i + 1);
            let (tls, auth) = (Self::tls_of(&pki, &id), Self::auth_of(&tokens));
            let conn = pg.conn_str();
            participants
                .push(start_participant_with(&id, coordinator.addr, &conn, None, tls, auth).await);
        }
        let client_tls = Self::tls_of(&pki, "client");
        let client_bearer = Bearer::new(tokens.as_ref().map(|t| t.client.as_str()));
        System {
            pgs,
            coordinator,
            participants,
            limits,
            data_dir,
            pki,
            tokens,
            client_tls,
            client_bearer,
        }
    }

    /// The URL of a server of this system: https:// with TLS.
    pub fn url(&self, addr: SocketAddr) -> String {
        format!("{}://{addr}", self.client_tls.scheme())
    }

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

    /// Restarts participant `i` on the same address (after `kill`).
    pub async fn restart_participant(&mut self, i: usize) {
        let addr = self.participants[i].addr;
        let conn = self.pgs[i].conn_str();
        let id = format!("p{}", i + 1);
        let (tls, auth) = (Self::tls_of(&self.pki, &id), Self::auth_of(&self.tokens));
        self.participants[i] =
            start_participant_with(&id, self.coordinator.addr, &conn, Some(addr), tls, auth).await;
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
        scalar(&self.pgs[i], sql).await
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

    /// Every test ends here: no prepared transaction is left anywhere. Phase 2 may still be
    /// finishing in the background, so this waits a bounded time.
    pub async fn assert_nothing_prepared(&self) {
        for (i, pg) in self.pgs.iter().enumerate() {
            let client = pg.client().await.unwrap();
            let mut left = i64::MAX;
            for _ in 0..100 {
                left = client
                    .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
                    .await
                    .unwrap()
                    .get(0);
                if left == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(left, 0, "database {i} still has prepared transactions");
        }
    }
}

pub async fn start_coordinator(data_dir: &std::path::Path, limits: Limits) -> Server {
    start_coordinator_with(data_dir, limits, Tls::default(), Auth::default()).await
}

pub async fn start_coordinator_with(
    data_dir: &std::path::Path,
    limits: Limits,
    tls: Tls,
    auth: Auth,
) -> Server {
    let (l, addr) = listener().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let config = coordinator::Config {
        data_dir: data_dir.to_path_buf(),
        etcd: None,
        id: Some("test-coord".into()),
        limits,
        drain_timeout: Duration::from_secs(2),
        tls,
        auth,
    };
    let task = tokio::spawn(coordinator::run(l, config, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        task,
    }
}

pub async fn start_participant(
    id: &str,
    coordinator: SocketAddr,
    postgres: &str,
    at: Option<SocketAddr>,
) -> Server {
    start_participant_with(
        id,
        coordinator,
        postgres,
        at,
        Tls::default(),
        Auth::default(),
    )
    .await
}

/// A participant of a replicated coordinator: `coordinator` is its replicas' URLs,
/// separated by commas.
pub async fn start_participant_of(id: &str, coordinator: &str, postgres: &str) -> Server {
    let (l, addr) = listener().await;
    let config = participant_config(
        id,
        coordinator.into(),
        postgres,
        Tls::default(),
        Auth::default(),
    );
    serve_participant(l, addr, config)
}

/// Runs a participant on `l` until the returned server is shut down or dropped.
fn serve_participant(l: TcpListener, addr: SocketAddr, config: participant::Config) -> Server {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(participant::run(l, config, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        task,
    }
}

fn participant_config(
    id: &str,
    coordinator: String,
    postgres: &str,
    tls: Tls,
    auth: Auth,
) -> participant::Config {
    participant::Config {
        max_connections: 40,
        resolve_interval: Duration::from_secs(2),
        tls,
        auth,
        ..participant::Config::new(id, coordinator, postgres)
    }
}

pub async fn start_participant_with(
    id: &str,
    coordinator: SocketAddr,
    postgres: &str,
    at: Option<SocketAddr>,
    tls: Tls,
    auth: Auth,
) -> Server {
    let (l, addr) = match at {
        // The old server's socket may linger for a moment after a kill.
        Some(addr) => {
            let mut tries = 0;
            loop {
                match TcpListener::bind(addr).await {
                    Ok(l) => break (l, addr),
                    Err(e) if tries < 50 => {
                        tries += 1;
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("rebind {addr}: {e}"),
                }
            }
        }
        None => listener().await,
    };
    let config = participant_config(
        id,
        format!("{}://{coordinator}", tls.scheme()),
        postgres,
        tls,
        auth,
    );
    serve_participant(l, addr, config)
}

pub fn int(v: i64) -> proto::Value {
    proto::Value::int(v)
}

pub fn text(v: &str) -> proto::Value {
    proto::Value::text(v)
}

pub fn outcome(o: i32) -> proto::Outcome {
    proto::Outcome::try_from(o).unwrap()
}

/// A server run as its own process (the built binary), killed on drop.
pub struct Proc {
    pub addr: SocketAddr,
    child: std::process::Child,
}

impl Proc {
    /// Starts `bin` (coordinator or participant) listening on `addr`, with `FAILPOINTS` set to
    /// `failpoints` (which makes it abort on the spot when one fires), and waits until it
    /// accepts connections.
    pub async fn start(bin: &str, addr: SocketAddr, args: &[String], failpoints: &str) -> Proc {
        Self::start_with_env(bin, addr, args, &[("FAILPOINTS", failpoints)]).await
    }

    /// As `start`, with these environment variables set.
    pub async fn start_with_env(
        bin: &str,
        addr: SocketAddr,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Proc {
        let path = match bin {
            "coordinator" => env!("CARGO_BIN_EXE_coordinator"),
            "participant" => env!("CARGO_BIN_EXE_participant"),
            other => panic!("no binary {other}"),
        };
        let child = std::process::Command::new(path)
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin}: {e}"));
        // Owned from here on, so a panic below still kills it.
        let proc = Proc { addr, child };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return proc;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{bin} did not start listening on {addr}");
    }

    /// Sends a signal by name (`TERM`, `KILL`, ...).
    pub fn signal(&self, name: &str) {
        let sent = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name} failed");
    }

    /// Waits (bounded) for the process to end by itself, e.g. at a failpoint.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the process did not exit");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address nobody listens on right now.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Runs `twopcctl ARGS`; returns (success, stdout, stderr).
pub async fn twopcctl(args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_twopcctl"));
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `check` every 100 ms, up to 30 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A throwaway cluster of its own (outside a `System`), with `setup` run on it.
pub async fn pg_with(setup: &'static str) -> PgCluster {
    let pg = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .unwrap()
        .unwrap();
    pg.client()
        .await
        .unwrap()
        .batch_execute(setup)
        .await
        .unwrap();
    pg
}

/// The first column of the first row of `sql`, run directly on `pg`, as an integer.
pub async fn scalar(pg: &PgCluster, sql: &str) -> i64 {
    pg.client()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
}

/// As [`scalar`], as the superuser: for what the participant's role may not read (the
/// one-phase markers).
pub async fn admin_scalar(pg: &PgCluster, sql: &str) -> i64 {
    pg.admin_client()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
}
