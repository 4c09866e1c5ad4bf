//! The distributed deadlock detector: the I/O around `deadlock.rs`.
//!
//! Every `--deadlock-interval-ms` it asks the participants of the live transactions that have
//! run at least `--deadlock-min-wait-ms` for their branches' waits of at least that long
//! (`Participant.Waits`; a participant with no statement running that long answers without
//! asking PostgreSQL), joins them into one wait-for graph, and aborts one victim per cycle
//! that spans databases. The abort is an ordinary one, except that it carries SQLSTATE 40P01:
//! the rollback cancels the victim's blocked statement, whose Execute fails with the reason,
//! and the survivors' statements go on. A crash anywhere here loses nothing: the victim is
//! still Active, which a restart aborts anyway (presumed abort), and the cycle is found again.

use super::deadlock::{self, Edge, Victim};
use super::log::Log;
use super::participants::Participants;
use super::transactions::{Coordinator, Live, now_ms};
use super::txn::State;
use crate::process::background::{self, First, Next};
use crate::proto::{self, TxnId};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How long one participant may take to report its waits.
const WAITS_TIMEOUT: Duration = Duration::from_secs(1);

/// What the participants reported.
#[derive(Debug, Default)]
pub struct Waits {
    pub waits: Vec<proto::LockWait>,
    /// Participants that could not be asked, with why.
    pub unreachable: Vec<String>,
}

impl<L: Log, P: Participants> Coordinator<L, P> {
    /// The waits, at least `min_wait` old, of the branches of every live transaction at least
    /// that old, asked of their participants now. Each wait names its participant as this
    /// coordinator enlisted it.
    pub async fn lock_waits(&self, min_wait: Duration) -> Waits {
        let oldest_ms = now_ms() - i64::try_from(min_wait.as_millis()).unwrap_or(i64::MAX);
        let live: Vec<Arc<Live>> = self.live.lock().unwrap().values().cloned().collect();
        // endpoint → participant id, over the transactions that could be waiting that long.
        let mut asked: BTreeMap<String, String> = BTreeMap::new();
        for l in &live {
            let txn = l.txn.lock().unwrap();
            if txn.state == State::Active && txn.created_ms <= oldest_ms {
                for b in &txn.branches {
                    asked.insert(b.endpoint.clone(), b.participant_id.clone());
                }
            }
        }
        let answers = futures::future::join_all(asked.iter().map(|(endpoint, id)| async move {
            let answer = self
                .participants
                .waits(endpoint, min_wait, WAITS_TIMEOUT)
                .await;
            (endpoint, id, answer)
        }))
        .await;
        let mut out = Waits::default();
        for (endpoint, id, answer) in answers {
            match answer {
                Ok(waits) => out.waits.extend(waits.into_iter().map(|mut w| {
                    w.participant_id = id.clone();
                    w
                })),
                Err(e) => out.unreachable.push(format!("{id} at {endpoint}: {e}")),
            }
        }
        out
    }

    /// One pass: gathers the waits, and aborts a victim in every cycle that spans databases.
    pub async fn break_deadlocks(self: &Arc<Self>) -> Vec<Victim> {
        let started = std::time::Instant::now();
        let gathered = self.lock_waits(self.limits.deadlock_min_wait).await;
        let edges: Vec<Edge> = gathered.waits.iter().filter_map(Edge::from_wait).collect();
        if edges.len() < 2 {
            return Vec::new();
        }
        let active = |id: TxnId| {
            self.live(id)
                .is_some_and(|l| l.txn.lock().unwrap().state == State::Active)
        };
        let victims = deadlock::victims(&edges, active);
        for victim in &victims {
            let Some(live) = self.live(victim.txn) else {
                continue;
            };
            crate::failpoint!("coordinator::deadlock_victim_chosen");
            // Under the transaction's lock: a Commit that got in first wins, and the victim
            // is then left alone (`abort_victim` aborts only an Active transaction).
            let aborted = self.start_abort(&live, |txn| txn.abort_victim(&victim.reason, now_ms()));
            if aborted {
                let resolved = Duration::from_millis(victim.formed_ms.into()) + started.elapsed();
                metrics::counter!("twopc_deadlocks_total").increment(1);
                metrics::histogram!("twopc_deadlock_resolution_seconds").record(resolved);
                tracing::info!(txn_id = %victim.txn, others = ?victim.others,
                    cycle_age_ms = resolved.as_millis() as u64, "distributed deadlock: aborted the victim");
            }
        }
        victims
    }

    /// Runs a pass every `interval`, until the coordinator is dropped.
    pub fn spawn_deadlock_detector(self: &Arc<Self>, interval: Duration) {
        background::every(self, First::AfterInterval, interval, |core| async move {
            core.break_deadlocks().await;
            Next::Again
        });
    }
}
