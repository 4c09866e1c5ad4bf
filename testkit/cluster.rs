//! Throwaway PostgreSQL clusters for the integration tests and the demo.
//!
//! Two-phase commit is exactly where a mock would lie to us (PREPARE TRANSACTION
//! surviving a crash, `max_prepared_transactions`, recovery after a kill), so the
//! tests run against a real server. Each `PgCluster` is a fresh `initdb` in its
//! own temp dir on its own port, so tests can run in parallel without sharing
//! state, and dropping it kills the server and deletes the files — also while a
//! panicking test unwinds.
//!
//! PostgreSQL refuses to run as root, and containers and CI usually are root. In
//! that case the temp dir is handed to the `postgres` OS user (which the Debian
//! `postgresql` package creates) and every PostgreSQL binary runs via `runuser`.
//!
//! Everything connects as [`ROLE`], a role without superuser that owns the database, as a
//! participant in production should (a participant refuses a superuser by default).
//!
//! A process killed outright (SIGKILL, a runner's timeout) drops nothing, and its servers would
//! run for ever. Each cluster's dir names its owner's pid, and the first cluster a process
//! starts stops and deletes the clusters of owners that are gone.
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use super::free_port;
use anyhow::{Context, Result, anyhow, bail};

/// Between probing a free port and the postmaster binding it, another test's
/// cluster may take it; a fresh port on retry almost always settles it.
const START_ATTEMPTS: u32 = 3;

/// The role tests, the demo and the benchmarks connect as: it owns the `postgres` database
/// (and so its `public` schema), and is no superuser.
pub const ROLE: &str = "twopc_participant";

/// In each cluster's dir: the pid of the process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// Run once as the superuser after `initdb`, followed by the one-phase markers' setup for
/// [`ROLE`] (`participant::marker::setup_sql`), as README tells an administrator to.
const CREATE_ROLE: &str =
    "CREATE ROLE twopc_participant LOGIN; ALTER DATABASE postgres OWNER TO twopc_participant;";

#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_root: bool,
    port: u16,
    settings: Settings,
}

/// Server settings that differ between uses.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `max_prepared_transactions`; 0 makes a server that cannot do two-phase commit.
    pub max_prepared: u32,
    /// Real fsync, for benchmarks measured against a durable baseline. Off by default: a
    /// throwaway cluster loses nothing worth keeping, and crash tests kill only the server,
    /// never the OS, so the page cache still holds everything.
    pub fsync: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_prepared: 64,
            fsync: false,
        }
    }
}

impl PgCluster {
    /// Runs `initdb` and starts the server with default [`Settings`]; blocks until it
    /// accepts connections.
    pub fn start() -> Result<PgCluster> {
        Self::start_with(Settings::default())
    }

    pub fn start_with(settings: Settings) -> Result<PgCluster> {
        let bin = find_bin_dir()?;
        let as_root = running_as_root();
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| sweep_orphans(&bin, as_root));
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(std::env::temp_dir())
            .context("creating temp dir for PostgreSQL")?;
        fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())?;
        // From here on, Drop cleans up whatever an early return leaves behind.
        let mut cluster = PgCluster {
            dir,
            bin,
            as_root,
            port: 0,
            settings,
        };
        if as_root {
            // tempfile makes the dir 0700 and root-owned; the postgres user must
            // reach it to create the data dir, socket and log inside.
            fs::set_permissions(cluster.dir.path(), fs::Permissions::from_mode(0o755))?;
            let mut chown = Command::new("chown");
            chown
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path());
            cluster.run(chown, "chown").context(
                "running as root needs the `postgres` user (apt-get install -y postgresql adds it)",
            )?;
        }

        let mut initdb = cluster.pg_command("initdb");
        // --no-sync: the cluster is thrown away. --locale=C: initdb fails if the
        // caller's LANG names a locale that is not installed.
        let flags = "-A trust -U postgres --no-sync -E UTF8 --locale=C";
        initdb.args(flags.split(' '));
        cluster.run(initdb, "initdb")?;

        for attempt in 1..=START_ATTEMPTS {
            cluster.port = free_port()?;
            match cluster.pg_start() {
                Ok(()) => {
                    cluster.create_role()?;
                    return Ok(cluster);
                }
                Err(e) if attempt < START_ATTEMPTS && is_port_clash(&e) => {
                    tracing::debug!("test PostgreSQL port {} was taken; retrying", cluster.port);
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt always returns")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// As [`ROLE`].
    pub fn conn_str(&self) -> String {
        let port = self.port;
        format!("host=127.0.0.1 port={port} user={ROLE} dbname=postgres")
    }

    /// As the superuser `postgres`: for what only a superuser may do (and for showing that a
    /// participant refuses to run as one).
    pub fn admin_conn_str(&self) -> String {
        let port = self.port;
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")
    }

    /// Turns TLS on with this certificate and key (PEM files), without a restart: clients
    /// may then ask for `sslmode=require` or `verify-full`.
    pub async fn enable_tls(&self, cert: &Path, key: &Path) -> Result<()> {
        let (crt, pem) = (
            self.data_dir().join("server.crt"),
            self.data_dir().join("server.key"),
        );
        fs::copy(cert, &crt).context("copying the server certificate")?;
        fs::copy(key, &pem).context("copying the server key")?;
        // PostgreSQL refuses a key others may read.
        fs::set_permissions(&pem, fs::Permissions::from_mode(0o600))?;
        if self.as_root {
            let mut chown = Command::new("chown");
            chown.args(["postgres:postgres"]).arg(&crt).arg(&pem);
            self.run(chown, "chown-tls")?;
        }
        let admin = self.admin_client().await?;
        // One statement per call: a multi-statement string runs as one transaction block,
        // which ALTER SYSTEM refuses.
        for sql in ["ALTER SYSTEM SET ssl = on", "SELECT pg_reload_conf()"] {
            admin.batch_execute(sql).await.context("turning ssl on")?;
        }
        // The postmaster reloads in the background; new sessions see it once it has.
        for _ in 0..100 {
            let fresh = self.admin_client().await?;
            let on: String = fresh.query_one("SHOW ssl", &[]).await?.get(0);
            if on == "on" {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        bail!("PostgreSQL on port {} did not turn ssl on", self.port)
    }

    fn create_role(&self) -> Result<()> {
        let mut psql = Command::new(self.bin.join("psql"));
        psql.args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &self.admin_conn_str(),
        ])
        .args(["-c", CREATE_ROLE])
        .args(["-c", &crate::participant::marker::setup_sql(ROLE)])
        .current_dir(self.dir.path())
        .stdin(Stdio::null());
        self.run(psql, "create-role")
    }

    /// Starts `n` clusters at once (each on a blocking thread: `initdb` takes a second or
    /// two) and runs `schema` on each.
    pub async fn start_many(
        n: usize,
        settings: Settings,
        schema: Option<&str>,
    ) -> Result<Vec<Arc<PgCluster>>> {
        let starts: Vec<_> = (0..n)
            .map(|_| tokio::task::spawn_blocking(move || PgCluster::start_with(settings)))
            .collect();
        let mut pgs = Vec::new();
        for start in starts {
            pgs.push(Arc::new(start.await??));
        }
        if let Some(schema) = schema {
            for pg in &pgs {
                pg.client()
                    .await?
                    .batch_execute(schema)
                    .await
                    .context("creating the schema")?;
            }
        }
        Ok(pgs)
    }

    /// Kills the server without a checkpoint, like a crash: prepared
    /// transactions must come back from the WAL on `restart`.
    pub fn stop_immediate(&self) {
        if let Err(e) = self.pg_stop() {
            tracing::warn!("stopping test PostgreSQL on port {}: {e:#}", self.port);
        }
    }

    /// Starts the server again on the same port and data dir.
    pub fn restart(&self) -> Result<()> {
        self.pg_start()
    }

    /// A client for test assertions, as [`ROLE`]; needs a tokio runtime.
    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        Self::connect(&self.conn_str()).await
    }

    /// A client as the superuser, for set-up only a superuser may do (`CREATE ROLE`).
    pub async fn admin_client(&self) -> Result<tokio_postgres::Client> {
        Self::connect(&self.admin_conn_str()).await
    }

    /// The first column of the first row of `sql`, run directly (outside twopc) as [`ROLE`],
    /// as an integer.
    pub async fn scalar(&self, sql: &str) -> Result<i64> {
        let row = self.client().await?.query_one(sql, &[]).await;
        Ok(row
            .with_context(|| format!("running {sql}"))?
            .get::<_, i64>(0))
    }

    /// As [`PgCluster::scalar`], as the superuser: for what [`ROLE`] may not read (the
    /// one-phase markers).
    pub async fn admin_scalar(&self, sql: &str) -> Result<i64> {
        let row = self.admin_client().await?.query_one(sql, &[]).await;
        Ok(row
            .with_context(|| format!("running {sql}"))?
            .get::<_, i64>(0))
    }

    /// How many transactions are prepared in it now.
    pub async fn prepared(&self) -> Result<i64> {
        self.scalar("SELECT count(*) FROM pg_prepared_xacts").await
    }

    async fn connect(conn_str: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {conn_str}"))?;
        tokio::spawn(async move {
            // Expected when a crash test kills the server under an open client.
            if let Err(e) = conn.await {
                tracing::debug!("test PostgreSQL connection ended: {e}");
            }
        });
        Ok(client)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn pg_start(&self) -> Result<()> {
        let log = self.log_path();
        // The log is appended across restarts; only this attempt's part explains a failure.
        let seen = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k '{}' -c max_prepared_transactions={} \
             -c max_connections=200 -c fsync={} -c shared_buffers=32MB",
            self.port,
            self.dir.path().display(),
            self.settings.max_prepared,
            if self.settings.fsync { "on" } else { "off" },
        );
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-l").arg(&log);
        cmd.args(["-w", "-t", "60", "-o", &opts, "start"]);
        self.run(cmd, "pg_ctl-start")
            .map_err(|e| anyhow!("{e:#}\nserver log {}:\n{}", log.display(), tail(&log, seen)))
    }

    fn pg_stop(&self) -> Result<()> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.args(["-m", "immediate", "-w", "-t", "60", "stop"]);
        self.run(cmd, "pg_ctl-stop")
    }

    fn pg_command(&self, program: &str) -> Command {
        pg_command(&self.bin, self.as_root, self.dir.path(), program)
    }

    /// Runs quietly: output goes to `<dir>/<what>.out` and shows up only in the error.
    fn run(&self, mut cmd: Command, what: &str) -> Result<()> {
        let out_path = self.dir.path().join(format!("{what}.out"));
        let out = File::create(&out_path)?;
        cmd.stdout(out.try_clone()?).stderr(out);
        let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
        if status.success() {
            return Ok(());
        }
        let output = fs::read_to_string(&out_path).unwrap_or_default();
        bail!("{what} failed ({status}):\n{}", output.trim_end())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // No pid file: never started, or already stopped by stop_immediate.
        if self.data_dir().join("postmaster.pid").exists()
            && let Err(e) = self.pg_stop()
        {
            tracing::warn!("test PostgreSQL may be left running: {e:#}");
        }
        // The TempDir field removes the directory after this.
    }
}

const DIR_PREFIX: &str = "twopc-pg-";

/// `program -D <dir>/data`, as the postgres user when we are root.
fn pg_command(bin: &Path, as_root: bool, dir: &Path, program: &str) -> Command {
    let exe = bin.join(program);
    let mut cmd = if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    // Our cwd (e.g. /root) may be unreadable to the postgres user, which initdb trips over.
    cmd.current_dir(dir).stdin(Stdio::null());
    cmd.arg("-D").arg(dir.join("data"));
    cmd
}

/// Stops and deletes the clusters whose owning process is gone. A dir without an owner file
/// is left alone: it may be one another process is creating (or an older version's).
fn sweep_orphans(bin: &Path, as_root: bool) {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for dir in entries.flatten().map(|e| e.path()) {
        let is_cluster = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(DIR_PREFIX));
        let Some(owner) = is_cluster
            .then(|| fs::read_to_string(dir.join(OWNER_FILE)).ok())
            .flatten()
        else {
            continue;
        };
        let owner = owner.trim();
        if owner.is_empty() || Path::new("/proc").join(owner).exists() {
            continue;
        }
        if dir.join("data/postmaster.pid").exists() {
            let mut stop = pg_command(bin, as_root, &dir, "pg_ctl");
            stop.args(["-m", "immediate", "-w", "-t", "60", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = stop.status();
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(
                "removed the test PostgreSQL cluster {} of process {owner}, which is gone",
                dir.display()
            ),
            Err(e) => tracing::warn!(
                "cannot remove the stale test cluster {}: {e}",
                dir.display()
            ),
        }
    }
}

fn is_port_clash(e: &anyhow::Error) -> bool {
    let msg = format!("{e:#}");
    msg.contains("could not bind") || msg.contains("Address already in use")
}

/// The last lines of `path` after its first `skip` bytes.
fn tail(path: &Path, skip: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(bytes.get(skip as usize..).unwrap_or_default());
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(30)..].join("\n")
}

/// No libc dependency for geteuid(); the effective uid is what PostgreSQL checks.
fn running_as_root() -> bool {
    if let Ok(status) = fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("Uid:"))
    {
        // Fields: real, effective, saved, filesystem.
        return line.split_whitespace().nth(2) == Some("0");
    }
    let id = Command::new("id").arg("-u").output();
    id.is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A dir with initdb, pg_ctl and psql: first on PATH, else the newest Debian-style install.
fn find_bin_dir() -> Result<PathBuf> {
    let has_both = |d: &Path| {
        ["initdb", "pg_ctl", "psql"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|d| has_both(d))
    {
        return Ok(dir);
    }
    // Debian keeps server binaries off PATH, one dir per major version.
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            // Major versions are plain numbers since 10; older ones are skipped.
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_both(&bin).then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        anyhow!(
            "PostgreSQL server binaries (initdb, pg_ctl, psql) not found on PATH or in \
             /usr/lib/postgresql/*/bin; install them with `apt-get install -y postgresql`"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_of_a_process_that_is_gone_is_swept_and_a_live_ones_kept() {
        let mut gone = Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let orphan = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .unwrap()
            .keep();
        fs::write(orphan.join(OWNER_FILE), gone.id().to_string()).unwrap();
        let live = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .unwrap();
        fs::write(live.path().join(OWNER_FILE), std::process::id().to_string()).unwrap();

        sweep_orphans(Path::new("/no/postgres/needed"), false);

        assert!(!orphan.exists(), "its owner is gone");
        assert!(live.path().exists(), "its owner is this test");
    }
}
