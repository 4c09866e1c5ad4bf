//! The deterministic pass: each named failpoint armed in turn in the process it lives in, the
//! workload run until it fires, the process restarted without it, recovery settled and checked.

use super::{Harness, indent, print_violations};
use crate::check::Violation;
use crate::report::Row;
use crate::system::{self, Role, Started};
use anyhow::Result;
use std::time::{Duration, Instant};

/// How long the workload runs on after the crashed process is back.
const AFTER_RESTART: Duration = Duration::from_secs(2);
/// ... and longer, up to this, until something committed in the scenario: a crash at its very
/// start leaves open branches whose row locks hold the workload up until their deadline (the
/// restarted coordinator forgot them), and a scenario with no commit checks nothing.
const AFTER_RESTART_MAX: Duration = Duration::from_secs(15);
/// How long a failpoint may take to fire under load.
const HIT_TIMEOUT: Duration = Duration::from_secs(30);

impl Harness {
    /// One failpoint: arm it, load until it fires, restart, settle, check.
    pub(super) async fn failpoint_scenario(
        &mut self,
        name: &'static str,
        label: &str,
    ) -> Result<Row> {
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
            started = self.sys.lead_with(role, HIT_TIMEOUT).await?;
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
}
