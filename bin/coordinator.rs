//! `coordinator`: the two-phase-commit coordinator process. Flags and env in, `run` out.

use clap::Parser;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use twopc::coordinator::{Config, EtcdConfig, EtcdUser, Limits, run};
use twopc::process::{auth, telemetry, tls};

/// The twopc coordinator: begins global transactions and commits them atomically across
/// PostgreSQL databases (through their participants), with its decisions logged in sled.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "TWOPC_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory of the decision log (sled) and the coordinator's id. Keep it: it is what
    /// makes commits survive a crash.
    #[arg(long, env = "TWOPC_DATA_DIR", default_value = "./twopc-data")]
    data_dir: PathBuf,
    /// The coordinator's stable id (A-Z a-z 0-9 _ -), recorded on first start; default: random.
    /// Replicas on etcd share it: it names the cluster, and every PostgreSQL gid carries it.
    #[arg(long, env = "TWOPC_ID")]
    id: Option<String>,
    /// Where the decision log lives: `sled` (in --data-dir, one coordinator) or `etcd` (on
    /// --etcd-endpoints: this process is one replica of a coordinator cluster, docs/HA.md).
    #[arg(long, env = "TWOPC_LOG", value_enum, default_value_t = LogBackend::Sled)]
    log: LogBackend,
    /// With `--log etcd`: the etcd members' client URLs, separated by commas.
    #[arg(
        long,
        env = "TWOPC_ETCD_ENDPOINTS",
        value_delimiter = ',',
        required_if_eq("log", "etcd")
    )]
    etcd_endpoints: Vec<String>,
    /// With `--log etcd`: the key prefix of this coordinator cluster; every replica of it
    /// gives the same, and no other cluster does.
    #[arg(long, env = "TWOPC_ETCD_PREFIX", default_value = "/twopc/default/")]
    etcd_prefix: String,
    /// With `--log etcd`: the leader's lease (ms). A dead leader is replaced after at most this
    /// long; a leader cut off from etcd this long steps down. etcd grants no less than 2 s with
    /// its default timings.
    #[arg(long, env = "TWOPC_LEASE_MS", default_value_t = 2_000)]
    lease_ms: u64,
    /// With `--log etcd`: this replica's URL as clients dial it; the others send clients
    /// here while it leads. Default: http(s)://<--listen>.
    #[arg(long, env = "TWOPC_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// With `--log etcd` and https:// endpoints: the PEM CA that the etcd members'
    /// certificates chain to (etcd's --trusted-ca-file, or the CA that signed its --cert-file).
    #[arg(long, env = "TWOPC_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// PEM client certificate shown to etcd (for etcd's --client-cert-auth).
    #[arg(long, env = "TWOPC_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, env = "TWOPC_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// The etcd user to authenticate as, when etcd has authentication enabled; its password
    /// is read from --etcd-password-file.
    #[arg(long, env = "TWOPC_ETCD_USER", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// File holding --etcd-user's password (surrounding whitespace trimmed).
    #[arg(long, env = "TWOPC_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// Timeout of a transaction that Begin gives none (ms).
    #[arg(long, env = "TWOPC_DEFAULT_TIMEOUT_MS", default_value_t = ms(Limits::default().default_timeout))]
    default_timeout_ms: u64,
    /// The longest timeout Begin accepts (ms).
    #[arg(long, env = "TWOPC_MAX_TIMEOUT_MS", default_value_t = ms(Limits::default().max_timeout))]
    max_timeout_ms: u64,
    /// How long phase 1 waits for each vote before counting it as no (ms).
    #[arg(long, env = "TWOPC_PREPARE_TIMEOUT_MS", default_value_t = ms(Limits::default().prepare_timeout))]
    prepare_timeout_ms: u64,
    /// How long Commit waits for phase-2 acknowledgements before answering anyway (ms).
    #[arg(long, env = "TWOPC_COMMIT_WAIT_MS", default_value_t = ms(Limits::default().commit_wait))]
    commit_wait_ms: u64,
    /// How long an aborted transaction's rollback is re-sent to a participant that cannot be
    /// reached (ms). Then the coordinator stops: the participant's own resolver rolls the branch
    /// back when it is back (presumed abort), and the transaction finishes and is pruned.
    #[arg(long, env = "TWOPC_ROLLBACK_RETRY_FOR_MS", default_value_t = ms(Limits::default().rollback_retry_for))]
    rollback_retry_for_ms: u64,
    /// How often enlisted participants are asked for orphaned prepared branches (ms; also at start).
    #[arg(long, env = "TWOPC_ORPHAN_SCAN_INTERVAL_MS", default_value_t = ms(Limits::default().orphan_scan_interval))]
    orphan_scan_interval_ms: u64,
    /// How long a finished transaction stays in the log for GetTransaction and repeated
    /// Commit/Abort, in hours; 0 keeps every one for ever.
    #[arg(long, env = "TWOPC_RETAIN_FINISHED_HOURS", default_value_t = hours(Limits::default().retain_finished))]
    retain_finished_hours: u64,
    /// Commit a transaction with a lone branch in one phase when its participant can
    /// (docs/PROTOCOL.md); `false`: always two phases.
    #[arg(long, env = "TWOPC_ONE_PHASE", default_value_t = true, action = clap::ArgAction::Set)]
    one_phase: bool,
    /// The most transactions live at once; Begin beyond it is RESOURCE_EXHAUSTED.
    #[arg(long, env = "TWOPC_MAX_LIVE_TRANSACTIONS", default_value_t = Limits::default().max_live)]
    max_live_transactions: usize,
    /// The most participants one transaction may enlist.
    #[arg(long, env = "TWOPC_MAX_BRANCHES", default_value_t = Limits::default().max_branches)]
    max_branches: usize,
    /// The only participants this coordinator enlists, as id=URL pairs separated by commas
    /// (`p1=https://db1:50061,p2=https://db2:50061`); RegisterBranch of any other, or at another
    /// URL, is PERMISSION_DENIED. Default: any.
    #[arg(long, env = "TWOPC_ALLOWED_PARTICIPANTS", value_parser = parse_participants)]
    allowed_participants: Option<HashMap<String, String>>,
    /// How often the participants of live transactions are asked for their lock waits, to
    /// break distributed deadlocks (ms); 0 turns the detector off.
    #[arg(long, env = "TWOPC_DEADLOCK_INTERVAL_MS", default_value_t = Limits::default().deadlock_interval.map_or(0, ms))]
    deadlock_interval_ms: u64,
    /// Lock waits shorter than this are not reported to the deadlock detector (ms).
    #[arg(long, env = "TWOPC_DEADLOCK_MIN_WAIT_MS", default_value_t = ms(Limits::default().deadlock_min_wait))]
    deadlock_min_wait_ms: u64,
    /// How often every enlisted participant's health is checked (grpc.health.v1), for
    /// `twopcctl participants` and the twopc_participant_serving gauge (ms); 0 turns it off.
    #[arg(long, env = "TWOPC_HEALTH_CHECK_INTERVAL_MS", default_value_t = Limits::default().health_check_interval.map_or(0, ms))]
    health_check_interval_ms: u64,
    /// How long shutdown waits for transactions in flight (ms).
    #[arg(long, env = "TWOPC_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    drain_timeout_ms: u64,
    #[command(flatten)]
    process: telemetry::Options,
    #[command(flatten)]
    tls: tls::Options,
    #[command(flatten)]
    auth: auth::Options,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogBackend {
    Sled,
    Etcd,
}

/// `p1=https://db1:50061,p2=…` as id → URL.
fn parse_participants(s: &str) -> Result<HashMap<String, String>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| match pair.trim().split_once('=') {
            Some((id, url)) if !id.is_empty() && !url.is_empty() => Ok((id.into(), url.into())),
            _ => Err(format!("{pair:?} is not id=URL")),
        })
        .collect()
}

/// The etcd flags, read and checked: every endpoint's scheme must match whether --etcd-ca is
/// given (the same rule as for gRPC peers), so a forgotten flag is a message at start, not a
/// refused handshake.
fn etcd_config(args: &Args, tls: &tls::Tls) -> anyhow::Result<EtcdConfig> {
    let etcd_tls = tls::Tls::load_files(
        ["--etcd-cert", "--etcd-key", "--etcd-ca"],
        args.etcd_cert.as_deref(),
        args.etcd_key.as_deref(),
        args.etcd_ca.as_deref(),
    )?;
    for url in &args.etcd_endpoints {
        etcd_tls.check_peer(url)?;
    }
    let user = match (&args.etcd_user, &args.etcd_password_file) {
        (Some(name), Some(file)) => Some(EtcdUser {
            name: name.clone(),
            password: std::fs::read_to_string(file)
                .map_err(|e| {
                    anyhow::anyhow!("cannot read --etcd-password-file {}: {e}", file.display())
                })?
                .trim()
                .to_string(),
        }),
        _ => None,
    };
    Ok(EtcdConfig {
        endpoints: args.etcd_endpoints.clone(),
        prefix: if args.etcd_prefix.ends_with('/') {
            args.etcd_prefix.clone()
        } else {
            format!("{}/", args.etcd_prefix)
        },
        lease_ttl: Duration::from_millis(args.lease_ms),
        advertise: args
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("{}://{}", tls.scheme(), args.listen)),
        tls: etcd_tls,
        user,
    })
}

/// A default of `Limits` as a flag's default, so each number is written once.
fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn hours(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| d.as_secs() / 3600)
}

/// mimalloc instead of the system allocator: a server spends about 15% of its CPU in `malloc`
/// and `free` (small buffers per gRPC message, from many threads), and with mimalloc the
/// coordinator alone commits up to a third more two-branch transactions a second here
/// (docs/BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let (args, runtime) = twopc::process::start::<Args>(|a| &a.process)?;
    runtime.block_on(async {
        telemetry::serve_metrics(args.process.metrics_listen)?;
        let listener = twopc::process::bind(args.listen).await?;
        let tls = tls::Tls::load(&args.tls)?;
        let etcd = match args.log {
            LogBackend::Sled => None,
            LogBackend::Etcd => Some(etcd_config(&args, &tls)?),
        };
        let config = Config {
            data_dir: args.data_dir,
            etcd,
            id: args.id,
            limits: Limits {
                default_timeout: Duration::from_millis(args.default_timeout_ms),
                max_timeout: Duration::from_millis(args.max_timeout_ms),
                prepare_timeout: Duration::from_millis(args.prepare_timeout_ms),
                commit_wait: Duration::from_millis(args.commit_wait_ms),
                rollback_retry_for: Duration::from_millis(args.rollback_retry_for_ms),
                orphan_scan_interval: Duration::from_millis(args.orphan_scan_interval_ms),
                retain_finished: (args.retain_finished_hours > 0)
                    .then(|| Duration::from_secs(args.retain_finished_hours * 3600)),
                one_phase: args.one_phase,
                max_live: args.max_live_transactions,
                max_branches: args.max_branches,
                allowed_participants: args.allowed_participants,
                deadlock_interval: (args.deadlock_interval_ms > 0)
                    .then(|| Duration::from_millis(args.deadlock_interval_ms)),
                deadlock_min_wait: Duration::from_millis(args.deadlock_min_wait_ms),
                health_check_interval: (args.health_check_interval_ms > 0)
                    .then(|| Duration::from_millis(args.health_check_interval_ms)),
                ..Limits::default()
            },
            drain_timeout: Duration::from_millis(args.drain_timeout_ms),
            tls,
            auth: auth::Auth::load(&args.auth, args.listen)?,
        };
        run(listener, config, twopc::process::signal::shutdown()).await
    })
}

#[cfg(test)]
mod tests {
    /// Clap checks its flag definitions only when it parses: a clash would panic at start.
    #[test]
    fn the_flags_are_well_formed() {
        <super::Args as clap::CommandFactory>::command().debug_assert();
    }
}
