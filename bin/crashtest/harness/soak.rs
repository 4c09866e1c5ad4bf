//! The soak: random SIGKILLs of the coordinator (or a replica) or a participant and immediate
//! stops of a PostgreSQL cluster, each restarted after a moment, with a check every
//! [`SOAK_CHECK_EVERY`] and at the end.

use super::{Harness, print_violations};
use crate::system::{DATABASES, Role};
use anyhow::Result;
use rand::Rng;
use std::time::{Duration, Instant};

/// How often the soak pauses to check.
pub const SOAK_CHECK_EVERY: Duration = Duration::from_secs(30);

impl Harness {
    /// Random crashes until `duration` has passed, with a check every ~30 s and at the end.
    pub(super) async fn soak(&mut self, duration: Duration) -> Result<()> {
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
