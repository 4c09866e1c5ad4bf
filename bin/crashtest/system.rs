//! The system under test, as separate OS processes: three throwaway PostgreSQL clusters, one
//! `coordinator` (with `--ha`, three replicas of it on a three-member etcd) and, per database, a `participant` or (`--embedded`) a `ledger` service with
//! the participant inside it, all on loopback, on ports fixed at start so a restarted process
//! comes back where the others expect it.
//!
//! The processes are the test kit's (`twopc::testkit::system::{Proc, Replicas}`): each appends
//! its stdout and stderr to `<dir>/<name>.log` under a header line per start, and is killed
//! (SIGKILL) when dropped, also while a panic unwinds; the clusters stop on their own drop.

use anyhow::{Context, Result, anyhow, bail};
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};
use twopc::process::auth::Bearer;
use twopc::process::tls::Tls;
use twopc::testkit::cluster::{PgCluster, Settings};
pub use twopc::testkit::system::{Proc, Started, is_abort, listen};
use twopc::testkit::system::{ReplicaSet, Replicas};
use twopc::testkit::wait::{self, Health};
use twopc::testkit::{EtcdCluster, TestPki, TestTokens, free_port};

/// The coordinator's `--rollback-retry-for-ms` here.
pub const ROLLBACK_RETRY_FOR_MS: u64 = 1500;
/// The number of databases (and participants).
pub const DATABASES: usize = 3;

/// How long a starting process may take to answer its health check.
const READY_TIMEOUT: Duration = twopc::testkit::system::process::READY_TIMEOUT;
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
}

/// The coordinator's id (with `--ha`, every replica's).
const COORDINATOR_ID: &str = "crash";

/// Every coordinator's flags besides where it listens, its id and its log.
fn coordinator_flags() -> Vec<String> {
    [
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

pub struct System {
    /// The coordinator, or with `--ha` its replicas (`Role::Coordinator` is replica 0).
    /// Declared before the clusters so they are killed before the clusters stop.
    coordinators: Coordinators,
    /// Participant (or ledger service) `i` of database `i`.
    participants: Vec<Proc>,
    pub pgs: Vec<Arc<PgCluster>>,
    pub timeline: Timeline,
    /// How the harness dials the processes (TLS with `--secure`).
    pub tls: Tls,
    /// What the harness sends them: the operator token with `--secure`, as it both runs
    /// transactions and lists them.
    pub bearer: Bearer,
    pub deployment: Deployment,
    /// With `--ha`: the etcd cluster the coordinator replicas keep their log on. After
    /// the processes, so the replicas die before it does.
    pub etcd: Option<EtcdCluster>,
    /// With `--secure`: the certificates and token files the processes read.
    _secure: Option<(TestPki, TestTokens)>,
}

/// The coordinator process, or its replicas.
enum Coordinators {
    One(Proc),
    Replicated(Replicas),
}

impl Coordinators {
    fn procs(&self) -> &[Proc] {
        match self {
            Coordinators::One(p) => std::slice::from_ref(p),
            Coordinators::Replicated(r) => &r.procs,
        }
    }

    fn procs_mut(&mut self) -> &mut [Proc] {
        match self {
            Coordinators::One(p) => std::slice::from_mut(p),
            Coordinators::Replicated(r) => &mut r.procs,
        }
    }
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
        let (tls, bearer) = match &secure {
            Some((pki, tokens)) => (pki.tls("crashtest")?, Bearer::new(Some(&tokens.operator))),
            None => Default::default(),
        };
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

        let schema = match deployment {
            Deployment::Standalone => crate::workload::SCHEMA,
            // The ledger creates its own tables; the harness adds the poison table.
            Deployment::Embedded => crate::workload::POISON_SCHEMA,
        };
        let pgs = PgCluster::start_many(DATABASES, Settings::default(), Some(schema))
            .await
            .context("starting PostgreSQL")?;

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
        let coordinator_args: Vec<String> = coordinator_flags()
            .into_iter()
            .chain(security_args("coordinator")?)
            .collect();
        let coordinators = match &etcd {
            // Every replica on the same etcd prefix and id: one coordinator.
            Some(etcd) => {
                let etcd_security_args: Vec<String> = match &secure {
                    Some((pki, _)) => {
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
                    None => Vec::new(),
                };
                let replicas = ReplicaSet {
                    program: coordinator_bin,
                    etcd,
                    replicas: REPLICAS,
                    id: COORDINATOR_ID,
                    dir,
                    args: etcd_security_args
                        .into_iter()
                        .chain(coordinator_args)
                        .collect(),
                    tls: tls.clone(),
                    logs: true,
                }
                .build()?;
                Coordinators::Replicated(replicas)
            }
            None => {
                let name = Role::Coordinator.name();
                let data_dir = dir.join(format!("{name}-data")).display().to_string();
                let addr = loopback(free_port()?);
                let args = listen(addr)
                    .into_iter()
                    .chain(["--data-dir".to_string(), data_dir])
                    .chain(["--id".to_string(), COORDINATOR_ID.into()])
                    .chain(coordinator_args)
                    .collect();
                let proc = Proc::new(&name, coordinator_bin, addr, args);
                Coordinators::One(
                    proc.log_to(&dir.join(format!("{name}.log")))
                        .tls(tls.clone()),
                )
            }
        };
        let coordinator_url = coordinators
            .procs()
            .iter()
            .map(Proc::url)
            .collect::<Vec<_>>()
            .join(",");
        let mut participants = Vec::new();
        for (i, pg) in pgs.iter().enumerate() {
            let name = Role::Participant(i).name();
            // (The ledger example takes the same flags.)
            let addr = loopback(free_port()?);
            let args = first_arg
                .clone()
                .into_iter()
                .chain(listen(addr))
                .chain([
                    "--id".into(),
                    name.clone(),
                    "--coordinator".into(),
                    coordinator_url.clone(),
                    "--postgres".into(),
                    pg.conn_str(),
                    "--resolve-interval-ms".into(),
                    "1000".into(),
                ])
                .chain(security_args(&name)?)
                .collect();
            let proc = Proc::new(&name, &participant_bin, addr, args);
            participants.push(
                proc.log_to(&dir.join(format!("{name}.log")))
                    .tls(tls.clone())
                    .env("RUST_LOG", "info"),
            );
        }
        let mut coordinators = coordinators;
        for proc in coordinators.procs_mut() {
            proc.set_env("RUST_LOG", "info");
        }
        let mut sys = System {
            coordinators,
            participants,
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
        let replicas = self.coordinators.procs().len();
        std::iter::once(Role::Coordinator)
            .chain((0..DATABASES).map(Role::Participant))
            .chain((1..replicas).map(Role::Replica))
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
            if self.running(role) && wait::serving(&self.tls, &self.url(role), Health::Leads).await
            {
                return Some(role);
            }
        }
        None
    }

    /// With `--ha`: makes `role` (armed with a failpoint) the leader, by stopping the other
    /// replicas (a clean stop hands the lead over at once) until it leads, then starting them
    /// again as standbys. It may die at its failpoint while recovering as the new leader.
    pub async fn lead_with(&mut self, role: Role, within: Duration) -> Result<Started> {
        let others: Vec<Role> = self
            .coordinator_roles()
            .into_iter()
            .filter(|r| *r != role)
            .collect();
        for other in &others {
            self.stop(*other).await;
        }
        let until = Instant::now() + within;
        let outcome = loop {
            if let Some(status) = self.exited(role) {
                break Started::Died(status);
            }
            if self.leader().await == Some(role) {
                break Started::Ready;
            }
            if Instant::now() > until {
                bail!("{} did not take the lead within {within:?}", role.name());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for other in others {
            self.start(other, None).await?;
        }
        Ok(outcome)
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
        self.proc(role).url()
    }

    pub fn proc(&self, role: Role) -> &Proc {
        match role {
            Role::Coordinator => &self.coordinators.procs()[0],
            Role::Replica(r) => &self.coordinators.procs()[r],
            Role::Participant(i) => &self.participants[i],
        }
    }

    fn proc_mut(&mut self, role: Role) -> &mut Proc {
        match role {
            Role::Coordinator => &mut self.coordinators.procs_mut()[0],
            Role::Replica(r) => &mut self.coordinators.procs_mut()[r],
            Role::Participant(i) => &mut self.participants[i],
        }
    }

    /// Starts the process (it must not be running) and waits until it serves; a process that
    /// exits during startup for another reason than a failpoint (e.g. its port was briefly
    /// taken) is tried again.
    pub async fn start(&mut self, role: Role, failpoints: Option<&str>) -> Result<Started> {
        let mut last_error = None;
        for attempt in 1..=START_ATTEMPTS {
            self.timeline.note(&format!(
                "start {} (attempt {attempt}) FAILPOINTS={}",
                role.name(),
                failpoints.unwrap_or("(none)")
            ));
            match self.proc_mut(role).start(failpoints).await {
                Ok(Started::Ready) => {
                    self.timeline.note(&format!("{} ready", role.name()));
                    return Ok(Started::Ready);
                }
                Ok(Started::Died(status)) => {
                    self.timeline
                        .note(&format!("{} exited during startup: {status}", role.name()));
                    return Ok(Started::Died(status));
                }
                Err(e) => {
                    self.timeline
                        .note(&format!("{} failed to start: {e:#}", role.name()));
                    last_error = Some(e);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(last_error.unwrap_or_else(|| anyhow!("{} did not start", role.name())))
    }

    /// SIGKILL. Returns whether it was running.
    pub fn kill(&mut self, role: Role) -> bool {
        let running = self.proc_mut(role).kill();
        self.timeline
            .note(&format!("SIGKILL {} (was running: {running})", role.name()));
        running
    }

    /// SIGTERM, then SIGKILL after a grace period. Returns whether SIGKILL was needed.
    pub async fn stop(&mut self, role: Role) -> bool {
        if !self.running(role) {
            return false;
        }
        self.timeline.note(&format!("SIGTERM {}", role.name()));
        let killed = self.proc_mut(role).stop(TERM_GRACE).await;
        let what = if killed { "needed SIGKILL" } else { "stopped" };
        self.timeline.note(&format!("{} {what}", role.name()));
        killed
    }

    /// The exit status if the process ended by itself since it was started.
    pub fn exited(&mut self, role: Role) -> Option<ExitStatus> {
        let status = self.proc_mut(role).exited();
        if let Some(status) = &status {
            self.timeline
                .note(&format!("{} exited by itself: {status}", role.name()));
        }
        status
    }

    /// Whether it is started (and not yet seen to have exited).
    pub fn running(&self, role: Role) -> bool {
        self.proc(role).running()
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

    fn all_procs_mut(&mut self) -> impl Iterator<Item = &mut Proc> {
        self.coordinators
            .procs_mut()
            .iter_mut()
            .chain(self.participants.iter_mut())
    }

    /// Lines added to the processes' logs since the last scan that say something went badly
    /// wrong: an atomicity alarm or a panic.
    pub fn scan_logs(&mut self) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for proc in self.all_procs_mut() {
            for line in proc.scan_log().lines() {
                if line.contains("ATOMICITY ALARM") || line.contains("panicked at") {
                    found.push((proc.name.clone(), line.to_string()));
                }
            }
        }
        found
    }

    /// Per process: how many ERROR lines its log has, and up to `n` distinct messages.
    pub fn error_digest(&self, n: usize) -> Vec<(String, usize, Vec<String>)> {
        self.coordinators
            .procs()
            .iter()
            .chain(&self.participants)
            .map(|p| {
                let text = p.whole_log();
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

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
