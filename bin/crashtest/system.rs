//! The system under test, as separate OS processes: three throwaway PostgreSQL clusters, one
//! `coordinator` (with `--ha`, three replicas of it on a three-member etcd) and, per database, a `participant` or (`--embedded`) a `ledger` service with
//! the participant inside it, all on loopback, on ports fixed at start so a restarted process
//! comes back where the others expect it.
//!
//! Every process appends its stdout and stderr to `<dir>/<name>.log`, under a header line per
//! start. A process handle kills its child (SIGKILL) when dropped, also while a panic unwinds;
//! the clusters stop on their own drop.

use anyhow::{Context, Result, anyhow, bail};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use twopc::process::auth::Bearer;
use twopc::process::tls::Tls;
use twopc::testkit::cluster::PgCluster;
use twopc::testkit::{EtcdCluster, TestPki, TestTokens, free_port};

/// The coordinator's `--rollback-retry-for-ms` here.
pub const ROLLBACK_RETRY_FOR_MS: u64 = 1500;
/// The number of databases (and participants).
pub const DATABASES: usize = 3;

/// How long a starting process may take to answer its health check.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts to start a process that exits during startup (e.g. its port is briefly taken).
const START_ATTEMPTS: u32 = 3;
/// How long a SIGTERM'd process may take before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// What fronts each database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deployment {
    /// The `participant` binary: the workload sends its SQL through Execute.
    Standalone,
    /// The `ledger` example service (examples/ledger.rs), which embeds the participant: the
    /// workload calls its `Post` inside ambient transactions, and the service runs its own
    /// statements in the branch.
    Embedded,
}

/// Which process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The coordinator; with `--ha`, replica 0, the one `coordinator::*` failpoints are armed in.
    Coordinator,
    /// Participant of database `i` (0-based; its id is `p{i+1}`).
    Participant(usize),
    /// With `--ha`: coordinator replica `r` (1 or 2).
    Replica(usize),
}

/// Coordinator replicas with `--ha`: `Role::Coordinator` and `Role::Replica(1..REPLICAS)`.
pub const REPLICAS: usize = 3;

impl Role {
    pub fn name(self) -> String {
        match self {
            Role::Coordinator => "coordinator".into(),
            Role::Participant(i) => format!("p{}", i + 1),
            Role::Replica(r) => format!("coordinator-{r}"),
        }
    }

    /// A coordinator process: the only one, or a replica of one.
    pub fn is_coordinator(self) -> bool {
        matches!(self, Role::Coordinator | Role::Replica(_))
    }

    /// The process a failpoint lives in: `coordinator::*` in the coordinator, `participant::*`
    /// in participant p1.
    pub fn of_failpoint(name: &str) -> Role {
        if name.starts_with("coordinator::") {
            Role::Coordinator
        } else {
            Role::Participant(0)
        }
    }

    fn index(self) -> usize {
        match self {
            Role::Coordinator => 0,
            Role::Participant(i) => i + 1,
            Role::Replica(r) => DATABASES + r,
        }
    }
}

/// How a start went.
#[derive(Debug)]
pub enum Started {
    /// Up and answering its health check.
    Ready,
    /// It was started with failpoints and died before it was ready (a failpoint on its
    /// startup path fired).
    Died(ExitStatus),
}

/// A harness-side timeline of what was done to the system, in `<dir>/timeline.log`.
pub struct Timeline {
    file: File,
    t0: Instant,
}

impl Timeline {
    pub fn new(dir: &Path) -> Result<Timeline> {
        Ok(Timeline {
            file: File::create(dir.join("timeline.log"))?,
            t0: Instant::now(),
        })
    }

    pub fn note(&mut self, what: &str) {
        let t = self.t0.elapsed().as_secs_f64();
        let _ = writeln!(self.file, "t={t:9.3}s {what}");
    }

    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

/// One server process, restartable with the same command line.
pub struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log_path: PathBuf,
    port: u16,
    child: Option<Child>,
    /// Where the log stood when the current run started.
    run_offset: u64,
    /// How far `scan_log` has read.
    scan_offset: u64,
}

impl Proc {
    fn spawn(&mut self, failpoints: Option<&str>, t: f64) -> Result<()> {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        self.run_offset = log.metadata()?.len();
        writeln!(
            log,
            "===== crashtest t={t:.3}s: starting {} FAILPOINTS={}",
            self.name,
            failpoints.unwrap_or("(none)")
        )?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        match failpoints {
            Some(spec) => cmd.env("FAILPOINTS", spec),
            None => cmd.env_remove("FAILPOINTS"),
        };
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// The exit status if the process has ended (it is reaped then); None while it runs or
    /// when it is not started.
    fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            Ok(None) => None,
            Err(_) => {
                // Cannot tell: treat it as gone (exit code 1 if even that fails) so the
                // harness restarts it.
                let _ = child.kill();
                let status = child.wait().unwrap_or(ExitStatus::from_raw(1 << 8));
                self.child = None;
                Some(status)
            }
        }
    }

    /// SIGKILL and reap. Returns whether it was running.
    fn kill(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let running = matches!(child.try_wait(), Ok(None));
        let _ = child.kill();
        let _ = child.wait();
        running
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log written since the current run started.
    pub fn run_log(&self) -> String {
        read_from(&self.log_path, self.run_offset)
    }

    /// The last `n` lines of the current run's log.
    pub fn run_log_tail(&self, n: usize) -> String {
        let text = self.run_log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(offset as usize..).unwrap_or_default()).into_owned()
}

/// Whether a gRPC server at `url` answers its health check with SERVING (for `service`, ""
/// being the whole server); `standby`: with any status at all, as a replica that does not lead
/// answers NOT_SERVING.
async fn serving(tls: &Tls, url: &str, service: &str, standby: bool) -> bool {
    let Ok(endpoint) = tls.endpoint(url) else {
        return false;
    };
    let endpoint = endpoint
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1));
    let Ok(Ok(channel)) = tokio::time::timeout(Duration::from_secs(2), endpoint.connect()).await
    else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: service.into(),
    });
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Ok(resp)) if standby || resp.get_ref().status() == ServingStatus::Serving
    )
}

/// Every coordinator's flags besides where it listens and logs.
fn coordinator_flags() -> Vec<String> {
    [
        "--id",
        "crash",
        "--default-timeout-ms",
        "5000",
        "--prepare-timeout-ms",
        "3000",
        "--commit-wait-ms",
        "2000",
        "--orphan-scan-interval-ms",
        "2000",
        // Short, so that a participant killed for a while has rollbacks abandoned to presumed
        // abort, in the soak as in the scenario that waits for it.
        "--rollback-retry-for-ms",
    ]
    .iter()
    .map(|f| f.to_string())
    .chain([ROLLBACK_RETRY_FOR_MS.to_string()])
    .collect()
}

/// The etcd root user's password with `--ha --secure` (a throwaway cluster's).
const ETCD_PASSWORD: &str = "crashtest-etcd";

/// Whether an exit status is the SIGABRT a fired failpoint ends a process with.
pub fn is_abort(status: &ExitStatus) -> bool {
    status.signal() == Some(6)
}

pub struct System {
    /// Index 0: the coordinator; 1..: the participants. Declared before the clusters so they
    /// are killed before the clusters stop.
    procs: Vec<Proc>,
    pub pgs: Vec<Arc<PgCluster>>,
    pub timeline: Timeline,
    /// How the harness dials the processes (TLS with `--secure`).
    pub tls: Tls,
    /// What the harness sends them: the operator token with `--secure`, as it both runs
    /// transactions and lists them.
    pub bearer: Bearer,
    pub deployment: Deployment,
    /// With `--ha`: the etcd cluster the coordinator replicas keep their log on. After
    /// `procs`, so the replicas die before it does.
    pub etcd: Option<EtcdCluster>,
    /// With `--secure`: the certificates and token files the processes read.
    _secure: Option<(TestPki, TestTokens)>,
}

impl System {
    /// Starts the clusters, creates the schema, and starts every process; with `secure`, every
    /// connection over mutual TLS and every call with a token.
    pub async fn launch(
        dir: &Path,
        secure: bool,
        deployment: Deployment,
        ha: bool,
    ) -> Result<System> {
        if secure && deployment == Deployment::Embedded {
            bail!("--secure is not supported with --embedded: the ledger example serves plaintext");
        }
        let secure = match secure {
            true => Some((TestPki::new()?, TestTokens::new()?)),
            false => None,
        };
        // Each process's TLS and token flags.
        let security_args = |name: &str| -> Result<Vec<String>> {
            Ok(match &secure {
                Some((pki, tokens)) => [pki.args(name)?, tokens.args()].concat(),
                None => Vec::new(),
            })
        };
        let scheme = if secure.is_some() { "https" } else { "http" };
        let exe = std::env::current_exe().context("locating the crashtest executable")?;
        let bin_dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent dir", exe.display()))?;
        let coordinator_bin = bin_dir.join("coordinator");
        // The ledger service is this binary's `ledger` mode (example_services.rs).
        let (participant_bin, first_arg) = match deployment {
            Deployment::Standalone => (bin_dir.join("participant"), None),
            Deployment::Embedded => (
                exe.clone(),
                Some(crate::example_services::LEDGER.to_string()),
            ),
        };
        for bin in [&coordinator_bin, &participant_bin] {
            if !bin.is_file() {
                bail!(
                    "{} not found: build it with `cargo build --features testing --bins`",
                    bin.display()
                );
            }
        }

        let starts: Vec<_> = (0..DATABASES)
            .map(|_| tokio::task::spawn_blocking(PgCluster::start))
            .collect();
        let mut pgs = Vec::new();
        for s in starts {
            pgs.push(Arc::new(s.await?.context("starting PostgreSQL")?));
        }
        for pg in &pgs {
            pg.client()
                .await?
                .batch_execute(match deployment {
                    Deployment::Standalone => crate::workload::SCHEMA,
                    // The ledger creates its own tables; the harness adds the poison table.
                    Deployment::Embedded => crate::workload::POISON_SCHEMA,
                })
                .await
                .context("creating the schema")?;
        }

        // With --secure, etcd as production runs it too: clients over mutual TLS, with a user.
        let etcd = match (ha, &secure) {
            (false, _) => None,
            (true, None) => Some(tokio::task::spawn_blocking(|| EtcdCluster::start(3)).await??),
            (true, Some((pki, _))) => {
                let etcd = tokio::task::block_in_place(|| EtcdCluster::start_tls(3, pki))?;
                etcd.enable_auth(pki, "root", ETCD_PASSWORD).await?;
                Some(etcd)
            }
        };
        let replicas: Vec<Role> = match ha {
            true => std::iter::once(Role::Coordinator)
                .chain((1..REPLICAS).map(Role::Replica))
                .collect(),
            false => vec![Role::Coordinator],
        };
        let coordinator_ports = replicas
            .iter()
            .map(|_| free_port())
            .collect::<Result<Vec<u16>>>()?;
        let coordinator_url = coordinator_ports
            .iter()
            .map(|port| format!("{scheme}://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        // With --ha, every replica on the same etcd prefix and id: one coordinator.
        let log_args: Vec<String> = match &etcd {
            Some(etcd) => [
                "--log",
                "etcd",
                "--etcd-endpoints",
                &etcd.endpoints_flag(),
                "--etcd-prefix",
                "/twopc/crash/",
                "--lease-ms",
                "2000",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect(),
            None => Vec::new(),
        };
        let etcd_security_args: Vec<String> = match (&etcd, &secure) {
            (Some(_), Some((pki, _))) => {
                let (cert, key) = pki.issue("coordinator-etcd")?;
                let password = dir.join("etcd-password");
                std::fs::write(&password, ETCD_PASSWORD)?;
                let path = |p: &Path| p.display().to_string();
                vec![
                    "--etcd-ca".into(),
                    path(&pki.ca_path()),
                    "--etcd-cert".into(),
                    path(&cert),
                    "--etcd-key".into(),
                    path(&key),
                    "--etcd-user".into(),
                    "root".into(),
                    "--etcd-password-file".into(),
                    path(&password),
                ]
            }
            _ => Vec::new(),
        };
        let mut coordinators = Vec::new();
        for (role, port) in replicas.iter().zip(&coordinator_ports) {
            coordinators.push(Proc {
                name: role.name(),
                program: coordinator_bin.clone(),
                args: [
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--data-dir".into(),
                    dir.join(format!("{}-data", role.name()))
                        .display()
                        .to_string(),
                ]
                .into_iter()
                .chain(log_args.iter().cloned())
                .chain(etcd_security_args.iter().cloned())
                .chain(coordinator_flags())
                .chain(security_args("coordinator")?)
                .collect(),
                log_path: dir.join(format!("{}.log", role.name())),
                port: *port,
                child: None,
                run_offset: 0,
                scan_offset: 0,
            });
        }
        let mut coordinators = coordinators.into_iter();
        let mut procs = vec![coordinators.next().expect("replica 0")];
        for (i, pg) in pgs.iter().enumerate() {
            let role = Role::Participant(i);
            let port = free_port()?;
            procs.push(Proc {
                name: role.name(),
                program: participant_bin.clone(),
                // (The ledger example takes the same flags.)
                args: first_arg
                    .clone()
                    .into_iter()
                    .chain([
                        "--listen".into(),
                        format!("127.0.0.1:{port}"),
                        "--id".into(),
                        role.name(),
                        "--coordinator".into(),
                        coordinator_url.clone(),
                        "--postgres".into(),
                        pg.conn_str(),
                        "--resolve-interval-ms".into(),
                        "1000".into(),
                    ])
                    .chain(security_args(&role.name())?)
                    .collect(),
                log_path: dir.join(format!("{}.log", role.name())),
                port,
                child: None,
                run_offset: 0,
                scan_offset: 0,
            });
        }
        // Replicas 1.. after the participants, at `Role::index`.
        procs.extend(coordinators);
        let (tls, bearer) = match &secure {
            Some((pki, tokens)) => (pki.tls("crashtest")?, Bearer::new(Some(&tokens.operator))),
            None => Default::default(),
        };
        let mut sys = System {
            procs,
            pgs,
            timeline: Timeline::new(dir)?,
            tls,
            bearer,
            deployment,
            etcd,
            _secure: secure,
        };
        sys.timeline.note("clusters up, schema created");
        for role in sys.roles() {
            sys.start(role, None).await?;
        }
        if sys.etcd.is_some() {
            sys.wait_for_leader().await?;
        }
        Ok(sys)
    }

    pub fn roles(&self) -> Vec<Role> {
        let replicas = match self.etcd {
            Some(_) => 1..REPLICAS,
            None => 1..1,
        };
        std::iter::once(Role::Coordinator)
            .chain((0..DATABASES).map(Role::Participant))
            .chain(replicas.map(Role::Replica))
            .collect()
    }

    /// The coordinator replicas (just the coordinator without `--ha`).
    pub fn coordinator_roles(&self) -> Vec<Role> {
        self.roles()
            .into_iter()
            .filter(|r| r.is_coordinator())
            .collect()
    }

    /// What clients and participants dial for the coordinator: every replica's URL.
    pub fn coordinator_urls(&self) -> String {
        self.coordinator_roles()
            .into_iter()
            .map(|r| self.url(r))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The replica that leads, if one does (without `--ha`: the coordinator, if it serves).
    pub async fn leader(&self) -> Option<Role> {
        for role in self.coordinator_roles() {
            if self.running(role)
                && serving(&self.tls, &self.url(role), "twopc.v1.Coordinator", false).await
            {
                return Some(role);
            }
        }
        None
    }

    /// Waits (up to the ready timeout) until some replica leads.
    pub async fn wait_for_leader(&mut self) -> Result<Role> {
        let until = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(role) = self.leader().await {
                self.timeline.note(&format!("{} leads", role.name()));
                return Ok(role);
            }
            if Instant::now() > until {
                bail!("no coordinator replica leads after {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// With `--ha`: SIGKILL etcd member `i`, as its machine dying would.
    pub fn etcd_kill(&mut self, i: usize) {
        self.timeline.note(&format!("SIGKILL etcd member {i}"));
        if let Some(etcd) = self.etcd.as_mut() {
            tokio::task::block_in_place(|| etcd.kill(i));
        }
    }

    /// With `--ha`: starts etcd member `i` again, and waits until it is healthy.
    pub fn etcd_restart(&mut self, i: usize) -> Result<()> {
        if let Some(etcd) = self.etcd.as_mut() {
            tokio::task::block_in_place(|| etcd.restart(i))?;
        }
        self.timeline.note(&format!("etcd member {i} restarted"));
        Ok(())
    }

    pub fn url(&self, role: Role) -> String {
        let port = self.procs[role.index()].port;
        format!("{}://127.0.0.1:{port}", self.tls.scheme())
    }

    pub fn proc(&self, role: Role) -> &Proc {
        &self.procs[role.index()]
    }

    /// Starts the process (it must not be running) and waits until it serves.
    pub async fn start(&mut self, role: Role, failpoints: Option<&str>) -> Result<Started> {
        let mut last_error = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let t = self.timeline.now();
            self.timeline.note(&format!(
                "start {} (attempt {attempt}) FAILPOINTS={}",
                role.name(),
                failpoints.unwrap_or("(none)")
            ));
            let proc = &mut self.procs[role.index()];
            proc.spawn(failpoints, t)?;
            let until = Instant::now() + READY_TIMEOUT;
            loop {
                if let Some(status) = proc.exited() {
                    self.timeline
                        .note(&format!("{} exited during startup: {status}", role.name()));
                    if failpoints.is_some() && is_abort(&status) {
                        return Ok(Started::Died(status));
                    }
                    last_error = format!(
                        "{} exited during startup ({status}); its log ends:\n{}",
                        role.name(),
                        proc.run_log_tail(15)
                    );
                    break;
                }
                let url = format!("{}://127.0.0.1:{}", self.tls.scheme(), proc.port);
                // A replica is ready once it answers, leading or standing by.
                let standby = role.is_coordinator() && self.etcd.is_some();
                if serving(&self.tls, &url, "", standby).await {
                    self.timeline.note(&format!("{} ready", role.name()));
                    return Ok(Started::Ready);
                }
                if Instant::now() > until {
                    proc.kill();
                    bail!(
                        "{} did not become ready within {READY_TIMEOUT:?}; its log ends:\n{}",
                        role.name(),
                        proc.run_log_tail(15)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!("{last_error}")
    }

    /// SIGKILL. Returns whether it was running.
    pub fn kill(&mut self, role: Role) -> bool {
        let running = self.procs[role.index()].kill();
        self.timeline
            .note(&format!("SIGKILL {} (was running: {running})", role.name()));
        running
    }

    /// SIGTERM, then SIGKILL after a grace period. Returns whether SIGKILL was needed.
    pub async fn stop(&mut self, role: Role) -> bool {
        let proc = &mut self.procs[role.index()];
        let Some(pid) = proc.pid() else { return false };
        self.timeline.note(&format!("SIGTERM {}", role.name()));
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let until = Instant::now() + TERM_GRACE;
        while Instant::now() < until {
            if proc.exited().is_some() {
                self.timeline.note(&format!("{} stopped", role.name()));
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill(role);
        true
    }

    /// The exit status if the process ended by itself since it was started.
    pub fn exited(&mut self, role: Role) -> Option<ExitStatus> {
        let status = self.procs[role.index()].exited();
        if let Some(status) = &status {
            self.timeline
                .note(&format!("{} exited by itself: {status}", role.name()));
        }
        status
    }

    /// Whether it is started (and not yet seen to have exited).
    pub fn running(&self, role: Role) -> bool {
        self.procs[role.index()].child.is_some()
    }

    /// `pg_ctl stop -m immediate` on database `i`: a crash, no checkpoint.
    pub async fn pg_crash(&mut self, i: usize) -> Result<()> {
        self.timeline
            .note(&format!("stop -m immediate PostgreSQL db{}", i + 1));
        let pg = Arc::clone(&self.pgs[i]);
        tokio::task::spawn_blocking(move || pg.stop_immediate()).await?;
        Ok(())
    }

    pub async fn pg_restart(&mut self, i: usize) -> Result<()> {
        let pg = Arc::clone(&self.pgs[i]);
        tokio::task::spawn_blocking(move || pg.restart())
            .await?
            .with_context(|| format!("restarting PostgreSQL db{}", i + 1))?;
        self.timeline
            .note(&format!("PostgreSQL db{} restarted", i + 1));
        Ok(())
    }

    /// Lines added to the processes' logs since the last scan that say something went badly
    /// wrong: an atomicity alarm or a panic.
    pub fn scan_logs(&mut self) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for proc in &mut self.procs {
            let len = std::fs::metadata(&proc.log_path).map_or(0, |m| m.len());
            let text = read_from(&proc.log_path, proc.scan_offset);
            proc.scan_offset = len.max(proc.scan_offset);
            for line in text.lines() {
                if line.contains("ATOMICITY ALARM") || line.contains("panicked at") {
                    found.push((proc.name.clone(), line.to_string()));
                }
            }
        }
        found
    }

    /// Per process: how many ERROR lines its log has, and up to `n` distinct messages.
    pub fn error_digest(&self, n: usize) -> Vec<(String, usize, Vec<String>)> {
        self.procs
            .iter()
            .map(|p| {
                let text = read_from(&p.log_path, 0);
                // tracing's format: `<timestamp> <LEVEL> <target>: <message> <fields>`.
                let errors: Vec<&str> = text
                    .lines()
                    .filter(|l| l.split_whitespace().nth(1) == Some("ERROR"))
                    .collect();
                let mut distinct: Vec<String> = Vec::new();
                for line in &errors {
                    // Drop the timestamp and the fields so repeats of one message collapse.
                    let msg = line.split_once(" ERROR ").map_or(*line, |(_, m)| m);
                    let msg = msg.split(" txn_id=").next().unwrap_or(msg);
                    let msg: String = msg.chars().take(200).collect();
                    if distinct.len() < n && !distinct.contains(&msg) {
                        distinct.push(msg);
                    }
                }
                (p.name.clone(), errors.len(), distinct)
            })
            .collect()
    }
}
