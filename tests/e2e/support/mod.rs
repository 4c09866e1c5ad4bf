//! Test support: the test kit's system builder and bank (`twopc::testkit`), and what only this
//! test binary can do or only scenarios want: the built binaries' paths (`CARGO_BIN_EXE_*`),
//! single servers started by hand, and helpers that panic where a scenario would fail.

#![allow(dead_code)] // each scenario file uses its own part of this module

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use twopc::coordinator::{self, Limits};
use twopc::participant;
use twopc::process::auth::Auth;
use twopc::process::tls::Tls;
use twopc::proto;
pub use twopc::testkit::system::{Proc, Server, System, test_limits};
#[allow(unused_imports)] // each scenario file uses its own part
pub use twopc::testkit::{PgCluster, Settings, TestPki, TestTokens, bank, eventually};

/// How long a scenario waits for a process to exit by itself (a failpoint, SIGTERM).
pub const EXIT_WAIT: Duration = Duration::from_secs(30);

pub async fn listener() -> (TcpListener, SocketAddr) {
    twopc::testkit::system::listener().await.unwrap()
}

pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A coordinator served in this process on `data_dir`, plaintext.
pub async fn start_coordinator(data_dir: &std::path::Path, limits: Limits) -> Server {
    let (l, _) = listener().await;
    let config = coordinator::Config {
        data_dir: data_dir.to_path_buf(),
        etcd: None,
        id: Some("test-coord".into()),
        limits,
        drain_timeout: Duration::from_secs(2),
        tls: Tls::default(),
        auth: Auth::default(),
    };
    Server::coordinator(l, config).unwrap()
}

/// A participant served in this process, plaintext; `at`: on that address again (after a
/// kill), else on a new port.
pub async fn start_participant(
    id: &str,
    coordinator: SocketAddr,
    postgres: &str,
    at: Option<SocketAddr>,
) -> Server {
    let l = match at {
        Some(addr) => twopc::testkit::system::rebind(addr).await.unwrap(),
        None => listener().await.0,
    };
    Server::participant(l, participant_config(id, url(coordinator), postgres)).unwrap()
}

/// A participant of a replicated coordinator: `coordinator` is its replicas' URLs,
/// separated by commas.
pub async fn start_participant_of(id: &str, coordinator: &str, postgres: &str) -> Server {
    let (l, _) = listener().await;
    Server::participant(l, participant_config(id, coordinator.into(), postgres)).unwrap()
}

fn participant_config(id: &str, coordinator: String, postgres: &str) -> participant::Config {
    participant::Config {
        max_connections: 40,
        resolve_interval: Duration::from_secs(2),
        ..participant::Config::new(id, coordinator, postgres)
    }
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

/// The path of a binary this package builds.
fn bin(name: &str) -> &'static str {
    match name {
        "coordinator" => env!("CARGO_BIN_EXE_coordinator"),
        "participant" => env!("CARGO_BIN_EXE_participant"),
        other => panic!("no binary {other}"),
    }
}

/// Starts `bin` (coordinator or participant) as a process listening on `addr`, with
/// `FAILPOINTS` set to `failpoints` (which makes it abort on the spot when one fires), and
/// waits until it answers its health check.
pub async fn process(bin_name: &str, addr: SocketAddr, args: &[String], failpoints: &str) -> Proc {
    process_with_env(bin_name, addr, args, &[("FAILPOINTS", failpoints)]).await
}

/// As [`process`], with these environment variables set. A coordinator counts as started
/// once it answers at all: a replica that stands by answers NOT_SERVING.
pub async fn process_with_env(
    bin_name: &str,
    addr: SocketAddr,
    args: &[String],
    env: &[(&str, &str)],
) -> Proc {
    let args = twopc::testkit::system::listen(addr)
        .into_iter()
        .chain(args.iter().cloned());
    let mut proc = Proc::new(bin_name, bin(bin_name), addr, args.collect())
        .ready_when(twopc::testkit::wait::Health::Answers);
    let mut failpoints = None;
    for (k, v) in env {
        match *k {
            "FAILPOINTS" => failpoints = Some(*v).filter(|v| !v.is_empty()),
            _ => proc = proc.env(k, v),
        }
    }
    match proc.start(failpoints).await {
        Ok(twopc::testkit::system::Started::Ready) => proc,
        Ok(died) => panic!("{bin_name} died starting: {died:?}"),
        Err(e) => panic!("{e:#}"),
    }
}

/// A loopback address nobody listens on right now.
pub fn free_addr() -> SocketAddr {
    let port = twopc::testkit::free_port().unwrap();
    SocketAddr::from(([127, 0, 0, 1], port))
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
    pg.scalar(sql).await.unwrap()
}

/// As [`scalar`], as the superuser: for what the participant's role may not read (the
/// one-phase markers).
pub async fn admin_scalar(pg: &PgCluster, sql: &str) -> i64 {
    pg.admin_scalar(sql).await.unwrap()
}
