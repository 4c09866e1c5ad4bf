//! The harness: the system under test, the workload's clients and what they were told, and
//! what every pass does around a crash (start the workload, bring the dead back, wait for
//! recovery to settle, check, report a row). The passes are the two files beside this one:
//! `deterministic.rs` fires each named failpoint once, `soak.rs` crashes at random.

mod deterministic;
mod soak;

use soak::SOAK_CHECK_EVERY;

use crate::check::{self, Violation};
use crate::report::{Report, Row};
use crate::system::{self, Role, System};
use crate::workload::{Clients, Recorder, Seen, Workload};
use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long recovery may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The system, the workload's clients and record, and what has been reported so far.
pub struct Harness {
    sys: System,
    clients: Clients,
    recorder: Arc<Recorder>,
    n_clients: usize,
    rng: StdRng,
    report: Report,
    round: usize,
}

impl Harness {
    pub fn new(sys: System, clients: Clients, n_clients: usize, seed: u64) -> Harness {
        Harness {
            sys,
            clients,
            recorder: Arc::new(Recorder::default()),
            n_clients,
            rng: StdRng::seed_from_u64(seed),
            report: Report::default(),
            round: 0,
        }
    }

    /// Runs the passes asked for, then prints the table of what ran (also when a pass
    /// stopped early) and the processes' errors. Ok(whether every check passed).
    pub async fn run(
        mut self,
        failpoints: Option<&[&'static str]>,
        soak: Option<u64>,
    ) -> Result<bool> {
        let started = Instant::now();
        let result = self.passes(failpoints, soak).await;
        self.report.print_table();
        self.report.print_errors(&self.sys);
        println!(
            "crashtest: {} transactions checked in {:.1} s",
            self.recorder.snapshot().len(),
            started.elapsed().as_secs_f64()
        );
        result?;
        Ok(self.report.passed())
    }

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
