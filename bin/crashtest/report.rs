//! The summary: one row per scenario (or soak check round), a total, and the violations.

use crate::check::Violation;
use crate::system::System;
use std::collections::HashSet;
use std::time::Duration;

#[derive(Default, Debug, Clone)]
pub struct Row {
    pub name: String,
    /// Crashes injected: failpoint aborts, SIGKILLs, immediate PostgreSQL stops.
    pub kills: usize,
    pub txns: usize,
    pub committed: usize,
    pub aborted: usize,
    /// Commit or Abort failed (or never answered): the client cannot know.
    pub unknown: usize,
    /// New violations found by this row's check.
    pub violations: usize,
    /// From the restart (deterministic) or the workload's pause (soak) to settled; None if it
    /// never settled.
    pub recover: Option<Duration>,
    pub result: String,
    pub failed: bool,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Every violation reported so far, in order.
    pub violations: Vec<Violation>,
    seen: HashSet<String>,
}

impl Report {
    /// The violations not reported before (checks are cumulative, so an old one comes back
    /// every round); records them.
    pub fn fresh(&mut self, found: Vec<Violation>) -> Vec<Violation> {
        let new: Vec<Violation> = found
            .into_iter()
            .filter(|v| self.seen.insert(v.key()))
            .collect();
        self.violations.extend(new.iter().cloned());
        new
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty() && !self.rows.iter().any(|r| r.failed)
    }

    pub fn print_table(&self) {
        let width = self
            .rows
            .iter()
            .map(|r| r.name.len())
            .chain([8])
            .max()
            .unwrap_or(8);
        println!();
        println!(
            "{:<width$} | kills |  txns | committed | aborted | unknown | violations | recover ms | result",
            "scenario"
        );
        println!(
            "{}-+-------+-------+-----------+---------+---------+------------+------------+--------",
            "-".repeat(width)
        );
        let mut total = Row {
            name: "total".into(),
            ..Row::default()
        };
        let mut max_recover: Option<Duration> = None;
        let mut unsettled = false;
        for r in &self.rows {
            print_row(r, width);
            total.kills += r.kills;
            total.txns += r.txns;
            total.committed += r.committed;
            total.aborted += r.aborted;
            total.unknown += r.unknown;
            total.violations += r.violations;
            match r.recover {
                Some(d) => max_recover = max_recover.max(Some(d)),
                None => unsettled = true,
            }
        }
        println!(
            "{}-+-------+-------+-----------+---------+---------+------------+------------+--------",
            "-".repeat(width)
        );
        total.recover = if unsettled { None } else { max_recover };
        let failed = self.rows.iter().filter(|r| r.failed).count();
        total.result = if failed == 0 && self.violations.is_empty() {
            "PASS".into()
        } else {
            format!("FAIL ({failed} rows)")
        };
        total.violations = self.violations.len();
        print_row(&total, width);
        println!(
            "(recover ms: deterministic rows from the crashed process's restart to settled, soak rows \
             from pausing the workload to settled; total: the longest. unknown: Commit/Abort got no answer.)"
        );
    }

    pub fn print_errors(&self, sys: &System) {
        if !self.violations.is_empty() {
            println!("\nViolations ({}):", self.violations.len());
            for v in &self.violations {
                println!("  {v}");
            }
        }
        println!("\nERROR lines in the process logs (for information):");
        for (who, count, messages) in sys.error_digest(5) {
            println!("  {who}: {count}");
            for m in messages {
                println!("      {m}");
            }
        }
    }
}

fn print_row(r: &Row, width: usize) {
    let recover = r
        .recover
        .map_or("timeout".to_string(), |d| d.as_millis().to_string());
    println!(
        "{:<width$} | {:>5} | {:>5} | {:>9} | {:>7} | {:>7} | {:>10} | {:>10} | {}",
        r.name, r.kills, r.txns, r.committed, r.aborted, r.unknown, r.violations, recover, r.result
    );
}
