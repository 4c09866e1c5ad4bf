//! A server run as an OS process of its own (a built binary), restartable with the same
//! command line, so a test or a harness can SIGKILL it, freeze it, or let a failpoint abort it,
//! and start it again where the others expect it.
//!
//! Its stdout and stderr are appended to a log file (or dropped), under a header line per
//! start, so a harness can read what one run said. The child is killed when the handle is
//! dropped, also while a panic unwinds.

use anyhow::{Context, Result, bail};
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::super::wait::{self, Health};
use crate::process::tls::Tls;

/// How long a starting process may take to answer its health check.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The flags that make a twopc server listen on `addr`.
pub fn listen(addr: SocketAddr) -> [String; 2] {
    ["--listen".into(), addr.to_string()]
}

/// How a start went.
#[derive(Debug)]
pub enum Started {
    /// Up and answering its health check.
    Ready,
    /// It was started with failpoints and a failpoint on its startup path aborted it.
    Died(ExitStatus),
}

/// Whether an exit status is the SIGABRT a fired failpoint ends a process with.
pub fn is_abort(status: &ExitStatus) -> bool {
    status.signal() == Some(6)
}

pub struct Proc {
    /// What the logs and errors call it.
    pub name: String,
    /// Where it listens (`--listen`).
    pub addr: SocketAddr,
    program: PathBuf,
    /// Its whole command line; it must make it listen on `addr`.
    args: Vec<String>,
    /// Set on every start, besides `FAILPOINTS`.
    env: Vec<(String, String)>,
    /// Where its output goes; `None`: stdout nowhere, stderr to ours.
    log_path: Option<PathBuf>,
    /// When it counts as started.
    health: Health,
    /// How the health check dials it.
    tls: Tls,
    child: Option<Child>,
    /// Where the log stood when the current run started.
    run_offset: u64,
    /// How far [`Proc::scan_log`] has read.
    scan_offset: u64,
}

impl Proc {
    /// A process of `program` run with `args`, which make it listen on `addr` (see
    /// [`listen`]); not started yet. It counts as started once its health check says SERVING.
    pub fn new(
        name: &str,
        program: impl Into<PathBuf>,
        addr: SocketAddr,
        args: Vec<String>,
    ) -> Proc {
        Proc {
            name: name.into(),
            addr,
            program: program.into(),
            args,
            env: vec![("RUST_LOG".into(), "warn".into())],
            log_path: None,
            health: Health::Serving,
            tls: Tls::default(),
            child: None,
            run_offset: 0,
            scan_offset: 0,
        }
    }

    /// Appends its output to `path`.
    pub fn log_to(mut self, path: &Path) -> Proc {
        self.log_path = Some(path.to_path_buf());
        self
    }

    /// Sets `key` in its environment (replacing an earlier value).
    pub fn env(mut self, key: &str, value: &str) -> Proc {
        self.set_env(key, value);
        self
    }

    /// As [`Proc::env`], on a process already made (for its next start).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    /// Counts it as started once its health check says this.
    pub fn ready_when(mut self, health: Health) -> Proc {
        self.health = health;
        self
    }

    /// Dials its health check with these settings (its server speaks TLS).
    pub fn tls(mut self, tls: Tls) -> Proc {
        self.tls = tls;
        self
    }

    /// How clients reach it: http(s)://addr.
    pub fn url(&self) -> String {
        format!("{}://{}", self.tls.scheme(), self.addr)
    }

    /// Starts it without waiting, with `FAILPOINTS` set to `failpoints` (or unset).
    pub fn spawn(&mut self, failpoints: Option<&str>) -> Result<()> {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let (stdout, stderr) = match &self.log_path {
            Some(path) => {
                let mut log = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                self.run_offset = log.metadata()?.len();
                writeln!(
                    log,
                    "===== starting {} FAILPOINTS={}",
                    self.name,
                    failpoints.unwrap_or("(none)")
                )?;
                (Stdio::from(log.try_clone()?), Stdio::from(log))
            }
            // No log: its errors still reach whoever watches (a test's output).
            None => (Stdio::null(), Stdio::inherit()),
        };
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
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

    /// Starts it and waits until it answers its health check (up to [`READY_TIMEOUT`]). With
    /// failpoints, a SIGABRT before then is [`Started::Died`]; any other early exit is an error
    /// that quotes the end of its log.
    pub async fn start(&mut self, failpoints: Option<&str>) -> Result<Started> {
        self.spawn(failpoints)?;
        let until = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
                if failpoints.is_some() && is_abort(&status) {
                    return Ok(Started::Died(status));
                }
                bail!(
                    "{} exited during startup ({status}); its log ends:\n{}",
                    self.name,
                    self.run_log_tail(15)
                );
            }
            if wait::serving(&self.tls, &self.url(), self.health).await {
                return Ok(Started::Ready);
            }
            if Instant::now() > until {
                self.kill();
                bail!(
                    "{} did not become ready within {READY_TIMEOUT:?}; its log ends:\n{}",
                    self.name,
                    self.run_log_tail(15)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status if the process has ended (it is reaped then); `None` while it runs or
    /// when it is not started.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            Ok(None) => None,
            Err(_) => {
                // Cannot tell: treat it as gone (exit code 1 if even that fails) so a harness
                // restarts it.
                let _ = child.kill();
                let status = child.wait().unwrap_or(ExitStatus::from_raw(1 << 8));
                self.child = None;
                Some(status)
            }
        }
    }

    /// Whether it is started and not yet seen to have exited.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL and reap. Returns whether it was running.
    pub fn kill(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let running = matches!(child.try_wait(), Ok(None));
        let _ = child.kill();
        let _ = child.wait();
        running
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("{} is not running", self.name);
        };
        let sent = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running kill")?;
        if !sent.success() {
            bail!("kill -{name} {pid} ({}) failed", self.name);
        }
        Ok(())
    }

    /// Waits up to `within` for it to end by itself (at a failpoint, after SIGTERM).
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let until = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if self.child.is_none() {
                bail!("{} is not running", self.name);
            }
            if Instant::now() > until {
                bail!("{} did not exit within {within:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns whether SIGKILL was needed.
    pub async fn stop(&mut self, grace: Duration) -> bool {
        if self.signal("TERM").is_err() {
            return false;
        }
        if self.wait_exit(grace).await.is_ok() {
            return false;
        }
        self.kill();
        true
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log written since the current run started.
    pub fn run_log(&self) -> String {
        self.log_path
            .as_deref()
            .map_or_else(String::new, |p| read_from(p, self.run_offset))
    }

    /// The last `n` lines of the current run's log.
    pub fn run_log_tail(&self, n: usize) -> String {
        let text = self.run_log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// What its log gained since the last call (the whole log the first time).
    pub fn scan_log(&mut self) -> String {
        let Some(path) = self.log_path.as_deref() else {
            return String::new();
        };
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        let text = read_from(path, self.scan_offset);
        self.scan_offset = len.max(self.scan_offset);
        text
    }

    /// Its whole log, every run.
    pub fn whole_log(&self) -> String {
        self.log_path
            .as_deref()
            .map_or_else(String::new, |p| read_from(p, 0))
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
