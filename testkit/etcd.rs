//! Throwaway etcd clusters, for the tests of the decision log on etcd and of coordinator
//! replicas (docs/HA.md).
//!
//! As with PostgreSQL, a fake would hide exactly what matters: a write is durable when a quorum
//! has it, a lease lapses on the server's clock, a member can die and a quorum can be lost. So
//! each [`EtcdCluster`] is real `etcd` processes (Debian's `etcd-server`) on loopback ports of
//! their own, with data under a temp dir; dropping it kills them and removes the files, also
//! while a failing test unwinds. etcd runs as root without complaint, so no `runuser` here.
//!
//! Timings are etcd's defaults (100 ms heartbeat, 1 s election timeout), which also fix the
//! shortest lease the server grants (1.5 s, rounded up to 2 s).
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TestPki, free_port};

/// How long a member may take to join and report healthy.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// Between probing free ports and the members binding them, another test may take one.
const START_ATTEMPTS: u32 = 3;

/// One member: its ports stay fixed across restarts, so the cluster's configuration does too.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Serves `/health` over plain HTTP, whatever the client port speaks.
    health_port: u16,
    process: Option<Child>,
}

/// The files of a cluster that serves its clients over TLS.
#[derive(Clone, Debug)]
struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

#[derive(Debug)]
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    /// `Some`: clients must connect over TLS and show a certificate of the CA.
    tls: Option<ServerTls>,
}

impl EtcdCluster {
    /// Starts `size` members (1 or 3, say) and returns once every one reports healthy.
    pub fn start(size: usize) -> Result<EtcdCluster> {
        Self::start_with(size, None)
    }

    /// Like [`start`](Self::start), but its members serve clients over mutual TLS only
    /// (`https://` endpoints; a client needs a certificate from `pki`), as a production etcd
    /// (Kubernetes', say) does.
    pub fn start_tls(size: usize, pki: &TestPki) -> Result<EtcdCluster> {
        let (cert, key) = pki.issue("etcd")?;
        let ca = pki.ca_path();
        Self::start_with(size, Some(ServerTls { cert, key, ca }))
    }

    fn start_with(size: usize, tls: Option<ServerTls>) -> Result<EtcdCluster> {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(size, tls.clone()) {
                Ok(cluster) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn try_start(size: usize, tls: Option<ServerTls>) -> Result<EtcdCluster> {
        let bin = which_etcd()?;
        let dir = tempfile::Builder::new().prefix("twopc-etcd-").tempdir()?;
        let members = (0..size)
            .map(|i| {
                Ok(Member {
                    name: format!("m{i}"),
                    client_port: free_port()?,
                    peer_port: free_port()?,
                    health_port: free_port()?,
                    process: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut cluster = EtcdCluster { dir, members, tls };
        for i in 0..size {
            cluster.spawn(&bin, i)?;
        }
        for i in 0..size {
            cluster.wait_healthy(i)?;
        }
        Ok(cluster)
    }

    /// Client URLs of every member, as `--etcd-endpoints` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port))
            .collect()
    }

    fn scheme(&self) -> &'static str {
        match self.tls {
            Some(_) => "https",
            None => "http",
        }
    }

    /// `--etcd-endpoints` for a coordinator: every member, comma-separated.
    pub fn endpoints_flag(&self) -> String {
        self.endpoints().join(",")
    }

    /// The index of a live member that is not etcd's raft leader (killing it costs no
    /// election), asked of each member's status over etcd's JSON gateway (plaintext only).
    pub fn a_follower(&self) -> Result<usize> {
        if self.tls.is_some() {
            bail!("a_follower asks etcd's JSON gateway in plaintext; this cluster serves TLS");
        }
        let mut leader = None;
        let mut ids = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.process.is_none() {
                continue;
            }
            let status = post(m.client_port, "/v3/maintenance/status", "{}")?;
            let status: serde_json::Value = serde_json::from_str(&status)
                .with_context(|| format!("etcd status of {}: {status}", m.name))?;
            let id = status["header"]["member_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            leader = status["leader"].as_str().map(str::to_string).or(leader);
            ids.push((i, id));
        }
        ids.into_iter()
            .find(|(_, id)| Some(id) != leader.as_ref())
            .map(|(i, _)| i)
            .context("no live etcd member is a follower")
    }

    /// Adds `user` with the root role and turns authentication on, as an operator does with
    /// `etcdctl user add`, `user grant-role` and `auth enable`; over TLS with a certificate
    /// from `pki` when the cluster serves TLS.
    #[cfg(feature = "etcd")]
    pub async fn enable_auth(&self, pki: &TestPki, user: &str, password: &str) -> Result<()> {
        let mut options = etcd_client::ConnectOptions::new();
        if self.tls.is_some() {
            let tls = pki.tls("etcd-admin")?.client().context("the test CA")?;
            options = options.with_tls(tls);
        }
        let mut admin = etcd_client::Client::connect(self.endpoints(), Some(options)).await?;
        admin.user_add(user, password, None).await?;
        admin.user_grant_role(user, "root").await?;
        admin.auth_enable().await?;
        Ok(())
    }

    /// Kills member `i` at once (SIGKILL), as a machine dying would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data and ports; returns once it is healthy (which, for a
    /// member that brings back the quorum, is once the cluster serves again).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(&which_etcd()?, i)?;
        self.wait_healthy(i)
    }

    fn spawn(&mut self, bin: &PathBuf, i: usize) -> Result<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))?;
        let client = format!("{}://127.0.0.1:{}", self.scheme(), m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let health = format!("http://127.0.0.1:{}", m.health_port);
        let mut command = Command::new(bin);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--listen-metrics-urls", &health])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", "twopc-test"])
            .args(["--initial-cluster-state", "new"])
            // Without compaction etcd keeps every revision of every record for ever.
            .args(["--auto-compaction-mode", "revision"])
            .args(["--auto-compaction-retention", "10000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.members[i].process = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self, i: usize) -> Result<()> {
        let until = Instant::now() + READY_WITHIN;
        let port = self.members[i].health_port;
        loop {
            if let Some(child) = self.members[i].process.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "etcd member {} exited ({status}):\n{}",
                    self.members[i].name,
                    self.log_tail(i)
                );
            }
            if healthy(port) {
                return Ok(());
            }
            if Instant::now() > until {
                bail!(
                    "etcd member {} not healthy within {READY_WITHIN:?}:\n{}",
                    self.members[i].name,
                    self.log_tail(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self, i: usize) -> String {
        let path = self
            .dir
            .path()
            .join(format!("{}.log", self.members[i].name));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        // The TempDir field removes the data after this.
    }
}

/// etcd's `/health` (plain HTTP on the metrics port) says true once the member sees a leader
/// and can serve a linearizable read.
fn healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

/// A POST to a member's client port, returning the body.
fn post(port: u16, path: &str, body: &str) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string()))
}

fn which_etcd() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .context("no `etcd` on PATH: run `bash scripts/setup` (it installs Debian's etcd-server)")
}
