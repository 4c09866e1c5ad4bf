//! `crashtest`: crash-recovery tests of a whole twopc system, run as separate OS processes.
//!
//! It starts three throwaway PostgreSQL clusters, a coordinator and a participant per database,
//! runs a bank-transfer workload against them, crashes processes, and after each crash waits
//! for recovery to settle and checks that every transaction is all-or-nothing, that what
//! clients were told holds, that money is conserved and that the coordinator agrees.
//!
//! - Deterministic pass (`--failpoints all` or `a,b`): each named failpoint in turn is armed
//!   (`FAILPOINTS=<name>=abort`) in the process it lives in (p1 for `participant::*`), the
//!   workload runs until it fires, and the process is restarted without it.
//! - Soak (`--soak SECS`): random SIGKILLs of the coordinator or a participant and immediate
//!   stops of a PostgreSQL cluster, each restarted after 0-2 s, with a check every ~30 s.
//!
//! - `--embedded`: the same over `ledger` services (examples/ledger.rs, run by this binary as
//!   `crashtest ledger …`) with the participant embedded in them, driven through their own API
//!   inside `transact`; `participant::*` failpoints then fire inside the service p1.
//!
//! Needs the `testing` feature (the binaries' failpoints): `cargo build --features testing
//! --bins && ./target/debug/crashtest`. Exits 1 on any violation or a failpoint that never
//! fired, 2 if the harness itself could not run.

mod check;
#[path = "../example_services.rs"]
mod example_services;
mod report;
mod system;
mod workload;

use anyhow::{Result, bail};
use check::Violation;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use report::{Report, Row};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use system::{DATABASES, Deployment, Role, Started, System};
use workload::{Clients, Recorder, Seen, Workload};

/// Crash-recovery test harness for twopc: crashes the coordinator, participants and
/// PostgreSQL under load and checks atomicity, durability and recovery.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Deterministic pass over these failpoints: `all`, or a comma-separated list of names
    /// from docs/FAILPOINTS.md (e.g. `coordinator::decision_flushed`). Default: all, unless
    /// --soak is given.
    #[arg(long)]
    failpoints: Option<String>,
    /// Random crashes for this many seconds, checking every ~30 s.
    #[arg(long)]
    soak: Option<u64>,
    /// Concurrent workload clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Seed of every random choice (printed; random by default).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the logs, timeline and coordinator data dir also when everything passes.
    #[arg(long)]
    keep: bool,
    /// Every connection over mutual TLS and every call with a bearer token, as deployed on a
    /// network (docs/SECURITY.md).
    #[arg(long)]
    secure: bool,
    /// Front each database with a `ledger` service that embeds its participant (the example's
    /// code, run by this binary), called through its own API, instead of the `participant`
    /// binary.
    #[arg(long)]
    embedded: bool,
    /// Three coordinator replicas on a three-member etcd (`--log etcd`, docs/HA.md) instead of
    /// one coordinator on sled: `coordinator::*` failpoints fire in the leader and another
    /// replica recovers; the soak also kills replicas and etcd members.
    #[arg(long)]
    ha: bool,
}

/// How long a failpoint may take to fire under load.
const HIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the workload runs on after the crashed process is back.
const AFTER_RESTART: Duration = Duration::from_secs(2);
/// ... and longer, up to this, until something committed in the scenario: a crash at its very
/// start leaves open branches whose row locks hold the workload up until their deadline (the
/// restarted coordinator forgot them), and a scenario with no commit checks nothing.
const AFTER_RESTART_MAX: Duration = Duration::from_secs(15);
/// How long recovery may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the soak pauses to check.
const SOAK_CHECK_EVERY: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    // `crashtest ledger …`: the service `--embedded` puts in front of each database.
    if let Some(kind) = example_services::asked() {
        let served = tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(example_services::serve(&kind)));
        return match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{kind}: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let failpoints = match chosen_failpoints(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crashtest: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.clients == 0 {
        eprintln!("crashtest: --clients must be at least 1");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crashtest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let dir = match tempfile::Builder::new().prefix("crashtest-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("crashtest: cannot create a temp dir: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(&args, failpoints, dir.path()));
    // Every process and cluster is gone by now (dropped inside `run`).
    drop(runtime);
    match result {
        Ok(true) if args.keep => {
            println!("crashtest: PASSED (logs kept in {})", dir.keep().display());
            ExitCode::SUCCESS
        }
        Ok(true) => {
            println!("crashtest: PASSED (logs removed)");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            let kept = dir.keep();
            println!(
                "crashtest: FAILED; logs, timeline and the coordinator's data dir are kept in {}",
                kept.display()
            );
            ExitCode::from(1)
        }
        Err(e) => {
            let kept = dir.keep();
            println!("crashtest: ERROR: {e:#}");
            println!(
                "crashtest: logs and the timeline are kept in {}",
                kept.display()
            );
            ExitCode::from(2)
        }
    }
}

/// The failpoints the deterministic pass covers, or None for no deterministic pass.
fn chosen_failpoints(args: &Args) -> Result<Option<Vec<&'static str>>> {
    let all: Vec<&'static str> = twopc::process::failpoints::ALL
        .iter()
        .map(|(n, _)| *n)
        .collect();
    let spec = match (&args.failpoints, args.soak) {
        (None, Some(_)) => return Ok(None),
        (None, None) => "all",
        (Some(s), _) => s.as_str(),
    };
    if spec.trim() == "all" {
        return Ok(Some(all));
    }
    let mut chosen = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match all.iter().find(|n| **n == name) {
            Some(n) => chosen.push(*n),
            None => bail!("unknown failpoint {name:?}; known: {}", all.join(", ")),
        }
    }
    if chosen.is_empty() {
        bail!("--failpoints names no failpoint");
    }
    Ok(Some(chosen))
}

/// The system, the workload's clients and record, and what has been reported so far.
struct Harness {
    sys: System,
    clients: Clients,
    recorder: Arc<Recorder>,
    n_clients: usize,
    rng: StdRng,
    report: Report,
    round: usize,
}

async fn run(
    args: &Args,
    failpoints: Option<Vec<&'static str>>,
    dir: &std::path::Path,
) -> Result<bool> {
    let seed = args.seed.unwrap_or_else(rand::random);
    println!(
        "crashtest: seed {seed} (rerun with --seed {seed}), {} clients, logs in {}",
        args.clients,
        dir.display()
    );
    let deployment = match args.embedded {
        true => Deployment::Embedded,
        false => Deployment::Standalone,
    };
    let sys = System::launch(dir, args.secure, deployment, args.ha).await?;
    let clients = Clients::new(&sys)?;
    clients.open_accounts().await?;
    println!(
        "crashtest: system up: coordinator {}, participants {}, PostgreSQL ports {}",
        sys.coordinator_urls(),
        (0..DATABASES)
            .map(|i| sys.url(Role::Participant(i)))
            .collect::<Vec<_>>()
            .join(" "),
        sys.pgs
            .iter()
            .map(|p| p.port().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut h = Harness {
        sys,
        clients,
        recorder: Arc::new(Recorder::default()),
        n_clients: args.clients,
        rng: StdRng::seed_from_u64(seed),
        report: Report::default(),
        round: 0,
    };
    let started = Instant::now();
    // Whatever stops the passes early, the table of what did run is printed.
    let result = h.passes(failpoints.as_deref(), args.soak).await;
    h.report.print_table();
    h.report.print_errors(&h.sys);
    println!(
        "crashtest: {} transactions checked in {:.1} s",
        h.recorder.snapshot().len(),
        started.elapsed().as_secs_f64()
    );
    result?;
    Ok(h.report.passed())
}

impl Harness {
    async fn passes(
        &mut self,
        failpoints: Option<&[&'static str]>,
        soak: Option<u64>,
    ) -> Result<()> {
        if let Some(names) = failpoints {
            let started = Instant::now();
            println!(
                "\n== Deterministic pass: {} failpoints, each fired once under load",
                names.len()
            );
            for (i, name) in names.iter().enumerate() {
                let label = format!("[{:>2}/{}] {name}", i + 1, names.len());
                let row = self.failpoint_scenario(name, &label).await?;
                self.report.rows.push(row);
            }
            println!(
                "== Deterministic pass took {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        if let Some(secs) = soak {
            println!("\n== Soak: random crashes for {secs} s, checks every ~{SOAK_CHECK_EVERY:?}");
            self.soak(Duration::from_secs(secs)).await?;
        }
        Ok(())
    }

    fn next_round(&mut self) -> usize {
        self.round += 1;
        self.recorder.set_round(self.round);
        self.round
    }

    fn start_workload(&mut self, hot: Option<f64>) -> Workload {
        let seed = self.rng.random();
        Workload::start(&self.clients, &self.recorder, self.n_clients, seed, hot)
    }

    /// Makes sure every process runs; one that died without being told to is a violation.
    async fn revive_the_dead(&mut self, violations: &mut Vec<Violation>) -> Result<()> {
        for role in self.sys.roles() {
            let status = if self.sys.running(role) {
                self.sys.exited(role)
            } else {
                None
            };
            if let Some(status) = status
                && self.stepped_down(role, &status)
            {
                self.sys.timeline.note(&format!(
                    "{} stepped down ({status}): its lease or its etcd write failed",
                    role.name()
                ));
            } else if let Some(status) = status {
                violations.push(Violation {
                    kind: "crash",
                    txn: None,
                    detail: format!(
                        "{} exited unexpectedly ({status}); its log ends:\n{}",
                        role.name(),
                        indent(&self.sys.proc(role).run_log_tail(20))
                    ),
                });
            }
            if !self.sys.running(role) {
                self.sys.start(role, None).await?;
            }
        }
        Ok(())
    }

    /// With `--ha`, a replica that lost its lease exits 75, and one whose etcd write failed
    /// aborts saying so: what the design asks of it when etcd members die, not a finding.
    fn stepped_down(&self, role: Role, status: &std::process::ExitStatus) -> bool {
        if !(role.is_coordinator() && self.sys.etcd.is_some()) {
            return false;
        }
        let log = self.sys.proc(role).run_log();
        status.code() == Some(twopc::coordinator::EXIT_DEPOSED)
            || (system::is_abort(status) && log.contains("decision log on etcd"))
    }

    /// Settles, checks, and returns (recovery time from `since`, new violations).
    async fn settle_and_check(
        &mut self,
        since: Instant,
        mut violations: Vec<Violation>,
    ) -> Result<(Option<Duration>, Vec<Violation>)> {
        self.revive_the_dead(&mut violations).await?;
        let recovered = match check::settle(&self.sys, &self.clients, SETTLE_TIMEOUT).await {
            Ok(_) => Some(since.elapsed()),
            Err(left) => {
                violations.push(Violation {
                    kind: "hanging",
                    txn: None,
                    detail: format!(
                        "not settled after {SETTLE_TIMEOUT:?}:\n{}",
                        indent(&left.join("\n"))
                    ),
                });
                None
            }
        };
        self.sys.timeline.note(&format!(
            "settled: {}",
            recovered.map_or("NO".into(), |d| format!("{} ms", d.as_millis()))
        ));
        let txns = self.recorder.snapshot();
        violations.extend(check::check(&self.sys, &self.clients, &txns).await);
        for (who, line) in self.sys.scan_logs() {
            violations.push(Violation {
                kind: "log",
                txn: None,
                detail: format!("{who}: {line}"),
            });
        }
        let new = self.report.fresh(violations);
        self.sys
            .timeline
            .note(&format!("checked: {} new violations", new.len()));
        Ok((recovered, new))
    }

    fn row(&self, name: String, round: usize, kills: usize) -> Row {
        let txns = self.recorder.snapshot();
        let mut row = Row {
            name,
            kills,
            ..Row::default()
        };
        for t in txns.iter().filter(|t| t.round == round) {
            row.txns += 1;
            match t.seen {
                Seen::Committed => row.committed += 1,
                Seen::Aborted => row.aborted += 1,
                Seen::Unknown | Seen::InFlight => row.unknown += 1,
            }
        }
        row
    }

    /// One failpoint: arm it, load until it fires, restart, settle, check.
    async fn failpoint_scenario(&mut self, name: &'static str, label: &str) -> Result<Row> {
        let role = Role::of_failpoint(name);
        let round = self.next_round();
        let mut kills = 0;
        self.sys.timeline.note(&format!(
            "===== scenario {label}: {name} in {}",
            role.name()
        ));
        // Re-arm: the system is settled and the workload stopped, so a graceful stop is quick.
        if self.sys.stop(role).await {
            kills += 1;
        }
        let spec = format!("{name}=abort");
        // A rollback is abandoned only when its participant stays unreachable: keep one down
        // until the failpoint fires (system::ROLLBACK_RETRY_FOR_MS after the abort).
        let held_down = (name == "coordinator::rollback_abandoned").then_some(Role::Participant(0));
        let mut hit = None;
        let mut workload = None;
        let mut started = self.sys.start(role, Some(&spec)).await?;
        if matches!(started, Started::Ready) && role == Role::Coordinator && self.sys.etcd.is_some()
        {
            started = self.lead_with(role).await?;
        }
        match started {
            Started::Died(status) => hit = Some((status, Duration::ZERO)),
            Started::Ready => {
                // The detector's failpoint needs deadlocks: every transfer on the hot accounts.
                let hot = (name == "coordinator::deadlock_victim_chosen").then_some(1.0);
                workload = Some(self.start_workload(hot));
                let t0 = Instant::now();
                if let Some(p) = held_down {
                    // Let branches enlist there first, so some aborts owe it a rollback; and
                    // make sure one does, whatever the workload's transactions were doing.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let Role::Participant(db) = p else {
                        unreachable!("a participant is held down")
                    };
                    let owed = self.clients.enlisted_on(db).await;
                    self.sys.kill(p);
                    kills += 1;
                    if let Ok(txn) = &owed {
                        let _ = self.clients.abort(txn).await;
                    }
                }
                while t0.elapsed() < HIT_TIMEOUT {
                    if let Some(status) = self.sys.exited(role) {
                        hit = Some((status, t0.elapsed()));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let mut violations = Vec::new();
        let status = match &hit {
            Some((status, after)) => {
                kills += 1;
                let log = self.sys.proc(role).run_log();
                if system::is_abort(status) && log.contains("failpoint hit") {
                    format!("hit after {:.1} s", after.as_secs_f64())
                } else {
                    violations.push(Violation {
                        kind: "crash",
                        txn: None,
                        detail: format!(
                            "{} exited ({status}) without the failpoint firing; its log ends:\n{}",
                            role.name(),
                            indent(&self.sys.proc(role).run_log_tail(20))
                        ),
                    });
                    format!("EXITED ({status})")
                }
            }
            None => {
                self.sys.kill(role);
                "NOT HIT".to_string()
            }
        };
        self.sys.timeline.note(&format!("{name}: {status}"));
        let restarted = Instant::now();
        self.sys.start(role, None).await?;
        if let Some(p) = held_down {
            self.sys.start(p, None).await?;
        }
        if let Some(w) = workload {
            tokio::time::sleep(AFTER_RESTART).await;
            let until = Instant::now() + AFTER_RESTART_MAX - AFTER_RESTART;
            while self.row(String::new(), round, 0).committed == 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            w.stop().await;
        }
        let (recovered, new) = self.settle_and_check(restarted, violations).await?;
        let mut row = self.row(name.to_string(), round, kills);
        row.violations = new.len();
        row.recover = recovered;
        let hit = status.starts_with("hit");
        row.result = if !hit {
            status.clone()
        } else if recovered.is_none() {
            "NOT SETTLED".into()
        } else if !new.is_empty() {
            "VIOLATION".into()
        } else if row.committed == 0 {
            // Nothing committed: the workload did not run, so nothing was really checked.
            "NO COMMITS".into()
        } else {
            "ok".into()
        };
        row.failed = row.result != "ok";
        println!(
            "{label}: {status} in {}; {} txns ({} committed, {} aborted, {} unknown); recovered in {}; {} violations",
            role.name(),
            row.txns,
            row.committed,
            row.aborted,
            row.unknown,
            recovered.map_or("(not settled)".into(), |d| format!("{} ms", d.as_millis())),
            new.len()
        );
        print_violations(&new);
        Ok(row)
    }

    /// With `--ha`: makes `role` (armed with a failpoint) the leader, by stopping the other
    /// replicas (a clean stop hands the lead over at once) until it leads, then starting them
    /// again as standbys. It may die at its failpoint while recovering as the new leader.
    async fn lead_with(&mut self, role: Role) -> Result<Started> {
        let others: Vec<Role> = self
            .sys
            .coordinator_roles()
            .into_iter()
            .filter(|r| *r != role)
            .collect();
        for other in &others {
            self.sys.stop(*other).await;
        }
        let until = Instant::now() + HIT_TIMEOUT;
        let outcome = loop {
            if let Some(status) = self.sys.exited(role) {
                break Started::Died(status);
            }
            if self.sys.leader().await == Some(role) {
                break Started::Ready;
            }
            if Instant::now() > until {
                bail!(
                    "{} did not take the lead within {HIT_TIMEOUT:?}",
                    role.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for other in others {
            self.sys.start(other, None).await?;
        }
        Ok(outcome)
    }

    /// Random crashes until `duration` has passed, with a check every ~30 s and at the end.
    async fn soak(&mut self, duration: Duration) -> Result<()> {
        let soak_start = Instant::now();
        let deadline = soak_start + duration;
        let mut check_round = 0;
        // Elapsed time against the soak's length, drawn on a terminal only.
        let progress = indicatif::ProgressBar::new(duration.as_secs()).with_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} s of soak, {msg}")
                .expect("a valid template"),
        );
        let ticker = {
            let progress = progress.clone();
            tokio::spawn(async move {
                loop {
                    progress.set_position(soak_start.elapsed().as_secs());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        while Instant::now() < deadline {
            progress.set_message(format!("round {}", check_round + 1));
            check_round += 1;
            let round = self.next_round();
            let round_start = Instant::now();
            let round_end = (round_start + SOAK_CHECK_EVERY).min(deadline);
            self.sys
                .timeline
                .note(&format!("===== soak round {check_round}"));
            let workload = self.start_workload(None);
            let mut kills = 0;
            let mut what = Vec::new();
            let mut violations = Vec::new();
            loop {
                let pause = Duration::from_millis(self.rng.random_range(1000..=5000));
                if Instant::now() + pause >= round_end {
                    tokio::time::sleep(round_end.saturating_duration_since(Instant::now())).await;
                    break;
                }
                tokio::time::sleep(pause).await;
                // A process that died by itself is a finding; bring it back before the next.
                self.revive_the_dead(&mut violations).await?;
                let down = Duration::from_millis(self.rng.random_range(0..=2000));
                let choices = if self.sys.etcd.is_some() { 4 } else { 3 };
                match self.rng.random_range(0..choices) {
                    0 => {
                        let replicas = self.sys.coordinator_roles();
                        let role = replicas[self.rng.random_range(0..replicas.len())];
                        self.sys.kill(role);
                        tokio::time::sleep(down).await;
                        self.sys.start(role, None).await?;
                        what.push(role.name());
                    }
                    3 => {
                        let member = self.rng.random_range(0..3);
                        self.sys.etcd_kill(member);
                        tokio::time::sleep(down).await;
                        self.sys.etcd_restart(member)?;
                        what.push(format!("etcd{member}"));
                    }
                    1 => {
                        let role = Role::Participant(self.rng.random_range(0..DATABASES));
                        self.sys.kill(role);
                        tokio::time::sleep(down).await;
                        self.sys.start(role, None).await?;
                        what.push(role.name());
                    }
                    _ => {
                        let i = self.rng.random_range(0..DATABASES);
                        self.sys.pg_crash(i).await?;
                        tokio::time::sleep(down).await;
                        self.sys.pg_restart(i).await?;
                        what.push(format!("pg{}", i + 1));
                    }
                }
                kills += 1;
            }
            let paused = Instant::now();
            workload.stop().await;
            let (recovered, new) = self.settle_and_check(paused, violations).await?;
            let name = format!(
                "soak round {check_round} ({:.0}-{:.0} s)",
                round_start.duration_since(soak_start).as_secs_f64(),
                paused.duration_since(soak_start).as_secs_f64()
            );
            let mut row = self.row(name, round, kills);
            row.violations = new.len();
            row.recover = recovered;
            row.result = if recovered.is_none() {
                "NOT SETTLED"
            } else if !new.is_empty() {
                "VIOLATION"
            } else if row.committed == 0 {
                "NO COMMITS"
            } else {
                "ok"
            }
            .into();
            row.failed = row.result != "ok";
            progress.suspend(|| println!(
                "soak round {check_round}: killed {}; {} txns ({} committed, {} aborted, {} unknown); settled {} after the pause; {} violations",
                if what.is_empty() {
                    "nothing".to_string()
                } else {
                    what.join(" ")
                },
                row.txns,
                row.committed,
                row.aborted,
                row.unknown,
                recovered.map_or("(not settled)".into(), |d| format!("{} ms", d.as_millis())),
                new.len()
            ));
            progress.suspend(|| print_violations(&new));
            self.report.rows.push(row);
        }
        ticker.abort();
        progress.finish_and_clear();
        Ok(())
    }
}

fn print_violations(violations: &[Violation]) {
    for v in violations {
        println!("   VIOLATION {v}");
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("      {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
