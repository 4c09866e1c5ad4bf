//! `--saga`: the crash harness over sagas (docs/SAGAS.md §5) instead of transfers.
//!
//! Clients submit sagas of three steps, one on each database; each action and each
//! compensation appends a row to `saga_log` (saga, step, op) in its step's database, so what
//! applied, and how often, can be counted afterwards. One saga in three has a last step that
//! fails for good (`SELECT 1/0` after its insert, which rolls the insert back) and must be
//! compensated. Processes are crashed at the saga failpoints (`twopc::process::failpoints::SAGA`,
//! deterministic pass) or at random (soak); after each, every process is brought back, every
//! saga a client submitted is submitted again (its answer may have been lost: a retry of the
//! same plan is the same saga), and once every saga has ended, the logs are checked:
//!
//! - `COMPLETED`: every step's action applied exactly once, none compensated;
//! - `COMPENSATED`: every step compensated exactly as often as its action applied, at most
//!   once (never a compensation of an action that did not apply, never an action twice);
//! - nothing else: a saga still running, or stuck, after [`SETTLE_TIMEOUT`] is a violation.
//!
//! With `--ha` the coordinator is three replicas on etcd: `coordinator::*` failpoints fire in
//! replica 0 made leader, and the soak kills whichever replica leads; another resumes every
//! saga from the log on etcd.

use crate::system::{DATABASES, Role, Started, System, is_abort};
use crate::workload::{Clients, bounded, request};
use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use twopc::proto::{self, SagaState, saga_call::Call};

/// Every database's table of what applied.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS saga_log (
    saga_id text NOT NULL, step text NOT NULL, op text NOT NULL, at timestamptz DEFAULT now())";

/// How long every saga has to end after the processes are back.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a failpoint may take to fire under the saga load.
const HIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the load runs on once the crashed process is back.
const AFTER_RESTART: Duration = Duration::from_secs(2);
/// How often the soak stops to check.
const SOAK_CHECK_EVERY: Duration = Duration::from_secs(30);

/// A saga a client submitted (answered or not).
#[derive(Clone)]
struct Submitted {
    plan: proto::SubmitSagaRequest,
    /// Its last step fails for good: it can only end compensated.
    fails: bool,
}

/// The clients submitting sagas, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// One pass's line in the report.
struct Row {
    name: String,
    status: String,
    sagas: usize,
    completed: usize,
    compensated: usize,
    violations: Vec<String>,
}

impl Row {
    /// Its line as the pass goes, after `what` happened, and each violation.
    fn print(&self, what: &str) {
        println!(
            "{what}; {} sagas ({} completed, {} compensated); {} violations",
            self.sagas,
            self.completed,
            self.compensated,
            self.violations.len()
        );
        for v in &self.violations {
            println!("   VIOLATION {v}");
        }
    }
}

/// The saga harness: the system, the clients, every saga submitted so far.
pub struct SagaHarness {
    sys: System,
    clients: Clients,
    n_clients: usize,
    rng: StdRng,
    submitted: Arc<Mutex<Vec<Submitted>>>,
    round: usize,
    rows: Vec<Row>,
}

impl SagaHarness {
    pub async fn new(sys: System, clients: Clients, n_clients: usize, seed: u64) -> Result<Self> {
        for pg in &sys.pgs {
            pg.client().await?.batch_execute(SCHEMA).await?;
        }
        Ok(SagaHarness {
            sys,
            clients,
            n_clients,
            rng: StdRng::seed_from_u64(seed),
            submitted: Arc::default(),
            round: 0,
            rows: Vec::new(),
        })
    }

    /// The passes asked for, then the table. Ok(whether every check passed).
    pub async fn run(
        mut self,
        failpoints: Option<&[&'static str]>,
        soak: Option<u64>,
    ) -> Result<bool> {
        let started = Instant::now();
        if let Some(names) = failpoints {
            println!(
                "\n== Saga deterministic pass: {} failpoints, each fired once under load",
                names.len()
            );
            for (i, name) in names.iter().enumerate() {
                let label = format!("[{:>2}/{}] {name}", i + 1, names.len());
                let row = self.failpoint_scenario(name, &label).await?;
                self.rows.push(row);
            }
        }
        if let Some(secs) = soak {
            println!(
                "\n== Saga soak: random crashes for {secs} s, checks every ~{SOAK_CHECK_EVERY:?}"
            );
            self.soak(Duration::from_secs(secs)).await?;
        }
        println!(
            "\n{:<52} {:>14} {:>6} {:>9} {:>11} {:>10}",
            "scenario", "status", "sagas", "completed", "compensated", "violations"
        );
        for r in &self.rows {
            println!(
                "{:<52} {:>14} {:>6} {:>9} {:>11} {:>10}",
                r.name,
                r.status,
                r.sagas,
                r.completed,
                r.compensated,
                r.violations.len()
            );
        }
        let total = self.submitted.lock().unwrap().len();
        let violations: usize = self.rows.iter().map(|r| r.violations.len()).sum();
        let unhit = self.rows.iter().filter(|r| r.status == "NOT HIT").count();
        println!(
            "crashtest --saga: {total} sagas checked in {:.1} s; {violations} violations; {unhit} failpoints not hit",
            started.elapsed().as_secs_f64()
        );
        Ok(violations == 0 && unhit == 0)
    }

    /// One failpoint: arm it, load until it fires, restart, settle, check.
    async fn failpoint_scenario(&mut self, name: &'static str, label: &str) -> Result<Row> {
        let role = Role::of_failpoint(name);
        self.round += 1;
        let first = self.submitted.lock().unwrap().len();
        self.sys.timeline.note(&format!(
            "===== saga scenario {label}: {name} in {}",
            role.name()
        ));
        self.sys.stop(role).await;
        let spec = format!("{name}=abort");
        let mut status = "NOT HIT".to_string();
        let mut load = None;
        let mut started = self.sys.start(role, Some(&spec)).await?;
        if matches!(started, Started::Ready) && role == Role::Coordinator && self.sys.etcd.is_some()
        {
            // The failpoint is armed in replica 0: it must lead.
            started = self.sys.lead_with(role, HIT_TIMEOUT).await?;
        }
        match started {
            Started::Died(s) => status = format!("hit at start ({s})"),
            Started::Ready => {
                load = Some(self.start_load());
                let t0 = Instant::now();
                while t0.elapsed() < HIT_TIMEOUT {
                    if let Some(s) = self.sys.exited(role) {
                        status = match is_abort(&s)
                            && self.sys.proc(role).run_log().contains("failpoint hit")
                        {
                            true => format!("hit after {:.1} s", t0.elapsed().as_secs_f64()),
                            false => format!("EXITED ({s})"),
                        };
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if status == "NOT HIT" {
            self.sys.kill(role);
        }
        self.sys.start(role, None).await?;
        if let Some(load) = load {
            tokio::time::sleep(AFTER_RESTART).await;
            load.stop().await;
        }
        let mut row = self.settle_and_check(name, first).await?;
        if !status.starts_with("hit") {
            row.violations.push(format!("{name}: {status}"));
        }
        row.status = status;
        row.print(&format!("{label}: {} in {}", row.status, role.name()));
        Ok(row)
    }

    /// Random SIGKILLs of the coordinator or a participant and immediate stops of a
    /// PostgreSQL, each brought back after up to 2 s, with a check every ~30 s.
    async fn soak(&mut self, duration: Duration) -> Result<()> {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            self.round += 1;
            let first = self.submitted.lock().unwrap().len();
            let round_end = (Instant::now() + SOAK_CHECK_EVERY).min(deadline);
            let load = self.start_load();
            let mut kills = 0;
            loop {
                let pause = Duration::from_millis(self.rng.random_range(1000..=5000));
                if Instant::now() + pause >= round_end {
                    tokio::time::sleep(round_end.saturating_duration_since(Instant::now())).await;
                    break;
                }
                tokio::time::sleep(pause).await;
                let down = Duration::from_millis(self.rng.random_range(0..=2000));
                let victim = self.rng.random_range(0..=DATABASES * 2);
                kills += 1;
                if victim == 0 {
                    // With --ha, whichever replica leads: another takes over.
                    let role = match self.sys.etcd.is_some() {
                        true => self.sys.leader().await.unwrap_or(Role::Coordinator),
                        false => Role::Coordinator,
                    };
                    self.sys.kill(role);
                    tokio::time::sleep(down).await;
                    self.sys.start(role, None).await?;
                } else if victim <= DATABASES {
                    let role = Role::Participant(victim - 1);
                    self.sys.kill(role);
                    tokio::time::sleep(down).await;
                    self.sys.start(role, None).await?;
                } else {
                    let db = victim - DATABASES - 1;
                    self.sys.pg_crash(db).await?;
                    tokio::time::sleep(down).await;
                    self.sys.pg_restart(db).await?;
                }
            }
            load.stop().await;
            let mut row = self
                .settle_and_check(&format!("soak round {}", self.round), first)
                .await?;
            row.status = format!("{kills} kills");
            row.print(&format!("soak round {}: {kills} kills", self.round));
            self.rows.push(row);
        }
        Ok(())
    }

    fn start_load(&mut self) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let urls: Vec<String> = (0..DATABASES)
            .map(|i| self.sys.url(Role::Participant(i)))
            .collect();
        let tasks = (0..self.n_clients)
            .map(|c| {
                let (stop, clients, submitted, urls) = (
                    Arc::clone(&stop),
                    self.clients.clone(),
                    Arc::clone(&self.submitted),
                    urls.clone(),
                );
                let (round, seed) = (self.round, self.rng.random::<u64>());
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed);
                    let mut k = 0;
                    while !stop.load(Ordering::Relaxed) {
                        k += 1;
                        let fails = rng.random_range(0..3) == 0;
                        let id = format!("r{round}-c{c}-{k}");
                        let s = Submitted {
                            plan: plan(&urls, &id, fails),
                            fails,
                        };
                        submitted.lock().unwrap().push(s.clone());
                        if submit(&clients, &s.plan).await.is_err() {
                            // Unknown: the check submits it again.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Brings every process back, submits every saga of this round again until answered,
    /// waits for each to end, and checks what applied.
    async fn settle_and_check(&mut self, name: &str, first: usize) -> Result<Row> {
        let mut violations = Vec::new();
        for role in self.sys.roles() {
            if self.sys.running(role)
                && let Some(status) = self.sys.exited(role)
            {
                // A replica that lost its lease steps down (exit 75): the design, not a finding.
                let deposed = status.code() == Some(twopc::coordinator::EXIT_DEPOSED);
                if !(role.is_coordinator() && self.sys.etcd.is_some() && deposed) {
                    violations.push(format!("{} exited unexpectedly ({status})", role.name()));
                }
            }
            if !self.sys.running(role) {
                self.sys.start(role, None).await?;
            }
        }
        let sagas: Vec<Submitted> = self.submitted.lock().unwrap()[first..].to_vec();
        let until = Instant::now() + SETTLE_TIMEOUT;
        let mut ends = HashMap::new();
        for s in &sagas {
            let id = s.plan.saga_id.clone();
            let end = loop {
                if submit(&self.clients, &s.plan).await.is_ok()
                    && let Ok(saga) = get(&self.clients, &id).await
                    && matches!(saga.state(), SagaState::Completed | SagaState::Compensated)
                {
                    break Some(saga);
                }
                if Instant::now() > until {
                    break get(&self.clients, &id).await.ok();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            ends.insert(id, end);
        }
        self.sys
            .timeline
            .note(&format!("{name}: every saga ended or timed out"));
        let applied = self.applied(&sagas).await?;
        let (mut completed, mut compensated) = (0, 0);
        for s in &sagas {
            let id = &s.plan.saga_id;
            let counts = |step: &str, op: &str| {
                applied
                    .get(&(id.clone(), step.to_string(), op.to_string()))
                    .copied()
                    .unwrap_or(0)
            };
            let steps = ["s1", "s2", "s3"];
            match ends
                .get(id)
                .cloned()
                .flatten()
                .map(|saga| (saga.state(), saga.reason))
            {
                Some((SagaState::Completed, _)) => {
                    completed += 1;
                    if s.fails {
                        violations.push(format!(
                            "saga {id} completed, but its last step always fails"
                        ));
                    }
                    for step in steps {
                        let (a, c) = (counts(step, "action"), counts(step, "compensate"));
                        if (a, c) != (1, 0) {
                            violations.push(format!("saga {id} completed, but step {step} applied {a} times and was compensated {c} times"));
                        }
                    }
                }
                Some((SagaState::Compensated, _)) => {
                    compensated += 1;
                    for step in steps {
                        let (a, c) = (counts(step, "action"), counts(step, "compensate"));
                        if a > 1 || a != c {
                            violations.push(format!("saga {id} compensated, but step {step} applied {a} times and was compensated {c} times"));
                        }
                    }
                }
                Some((state, reason)) => violations.push(format!(
                    "saga {id} is {} after {SETTLE_TIMEOUT:?}: {reason}",
                    state.as_str_name()
                )),
                None => violations.push(format!(
                    "saga {id} is unknown to the coordinator after {SETTLE_TIMEOUT:?}"
                )),
            }
        }
        for (i, pg) in self.sys.pgs.iter().enumerate() {
            let prepared = pg.prepared().await?;
            if prepared != 0 {
                violations.push(format!(
                    "database {i} holds {prepared} prepared transactions"
                ));
            }
        }
        for (who, line) in self.sys.scan_logs() {
            violations.push(format!("{who}: {line}"));
        }
        Ok(Row {
            name: name.to_string(),
            status: String::new(),
            sagas: sagas.len(),
            completed,
            compensated,
            violations,
        })
    }

    /// How often each (saga, step, op) applied, over every database.
    async fn applied(
        &self,
        sagas: &[Submitted],
    ) -> Result<HashMap<(String, String, String), usize>> {
        let ids: Vec<String> = sagas.iter().map(|s| s.plan.saga_id.clone()).collect();
        let mut counts = HashMap::new();
        for pg in &self.sys.pgs {
            let client = pg.client().await?;
            let rows = client
                .query(
                    "SELECT saga_id, step, op, count(*) FROM saga_log WHERE saga_id = ANY($1) GROUP BY 1, 2, 3",
                    &[&ids],
                )
                .await?;
            for r in rows {
                let n: i64 = r.get(3);
                *counts.entry((r.get(0), r.get(1), r.get(2))).or_insert(0) += n as usize;
            }
        }
        Ok(counts)
    }
}

/// A saga of three steps, step `i` on database `i`; with `fails`, the last action fails for
/// good after its insert (which its rollback takes back).
fn plan(urls: &[String], id: &str, fails: bool) -> proto::SubmitSagaRequest {
    let log =
        |op: &str| format!("INSERT INTO saga_log (saga_id, step, op) VALUES ($1, $2, '{op}')");
    let call = |url: &str, step: &str, op: &str, fail: bool| {
        let mut statements = vec![proto::Statement {
            sql: log(op),
            params: vec![proto::Value::text(id), proto::Value::text(step)],
        }];
        if fail {
            statements.push(proto::Statement {
                sql: "SELECT 1 / 0".into(),
                params: vec![],
            });
        }
        proto::SagaCall {
            call: Some(Call::Sql(proto::SqlCall {
                participant: url.to_string(),
                statements,
                bind_outputs: false,
            })),
        }
    };
    let steps = urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let step = format!("s{}", i + 1);
            proto::SagaStepPlan {
                action: Some(call(url, &step, "action", fails && i == urls.len() - 1)),
                compensation: Some(call(url, &step, "compensate", false)),
                name: step,
                depends_on: vec![],
            }
        })
        .collect();
    proto::SubmitSagaRequest {
        saga_id: id.into(),
        steps,
        options: Some(proto::SagaOptions {
            step_timeout_ms: 5_000,
            // A crash must never exhaust a step: every saga ends by its plan, not by a count.
            attempts: 1000,
            initial_backoff_ms: 50,
            max_backoff_ms: 1_000,
            on_exhausted: proto::OnExhausted::Compensate as i32,
        }),
    }
}

async fn submit(
    clients: &Clients,
    plan: &proto::SubmitSagaRequest,
) -> Result<proto::Saga, tonic::Status> {
    bounded(
        clients
            .coordinator
            .clone()
            .submit_saga(request(plan.clone())),
    )
    .await
}

async fn get(clients: &Clients, id: &str) -> Result<proto::Saga, tonic::Status> {
    bounded(
        clients
            .coordinator
            .clone()
            .get_saga(request(proto::GetSagaRequest {
                saga_id: id.into(),
                wait_ms: 2_000,
            })),
    )
    .await
}
