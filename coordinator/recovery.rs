//! Recovery: finishing what a previous run of the coordinator left undone, and resolving
//! branches prepared in PostgreSQL that no live transaction owns.
//!
//! At start, before serving, every unfinished record in the log goes back into the live table:
//! a durable commit decision is re-driven (COMMIT PREPARED, retried until every branch
//! acknowledges); anything else never reached a decision, so it aborts and its branches are
//! rolled back (presumed abort).
//!
//! Orphans are branches that a participant prepared while the coordinator died before logging
//! them (or whose record was a lost hint). The log's participant registry says whom to ask:
//! `Participant.Recover` lists our prepared txn ids there. Order matters, the way Citus reads
//! it: the prepared list is read *first*, the live table *after*. A txn whose vote is in flight
//! is live from Begin until its final record is written, so any id on that list that is not
//! live by then is either finished (its record says how) or from a previous run (no commit
//! record: abort). Acting on ids read before the live check can never roll back a transaction
//! that is being committed right now.

use super::error::Error;
use super::log::Log;
use super::participants::{Ending, Participants, PeerError};
use super::transactions::{Coordinator, Live, now_ms};
use super::txn::{Decision, State};
use crate::process::background::{self, First, Next};
use crate::proto::TxnId;
use futures::StreamExt;
use std::sync::Arc;
use tracing::Instrument;

/// How often recovery's progress and the gauges are published.
const SECOND: std::time::Duration = std::time::Duration::from_secs(1);

/// What one orphan scan did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OrphanScan {
    /// Participants in the registry, asked for their prepared branches.
    pub participants: usize,
    /// Of those, the ones that did not answer (asked again next scan).
    pub unreachable: usize,
    /// Orphans whose record says commit, committed.
    pub committed: usize,
    /// Orphans with no commit record, rolled back (presumed abort).
    pub rolled_back: usize,
    /// Orphans whose phase 2 failed this time.
    pub failed: usize,
}

impl<L: Log, P: Participants> Coordinator<L, P> {
    /// Loads every unfinished record and restarts its phase 2. Returns how many there were.
    pub fn recover(self: &Arc<Self>) -> Result<usize, Error> {
        self.recover_sagas()?;
        let unfinished = self.log.unfinished()?;
        let n = unfinished.len();
        for mut txn in unfinished {
            let decision = txn.recover(now_ms());
            let announced = decision.outcome();
            self.put(&txn);
            tracing::info!(txn_id = %txn.id, ?announced, branches = txn.branches.len(), "recovering");
            metrics::counter!("twopc_recovered_transactions_total").increment(1);
            let id = txn.id;
            let live = Live::new(txn, announced);
            self.live.lock().unwrap().insert(id, Arc::clone(&live));
            let this = Arc::clone(self);
            let span = live.span("recover");
            if decision == Decision::OnePhase {
                tokio::spawn(async move { this.run_one_phase(live, false).await }.instrument(span));
            } else {
                tokio::spawn(async move { this.finish_branches(live).await }.instrument(span));
            }
        }
        if n > 0 {
            tracing::info!(
                transactions = n,
                "recovery: unfinished transactions are being finished"
            );
            self.spawn_recovery_progress(n);
        }
        Ok(n)
    }

    /// Reports recovery's progress every second until every recovered transaction is finished:
    /// a log line and the `twopc_recovery_pending_transactions` gauge. The recovered ones are
    /// the live transactions created before this start.
    fn spawn_recovery_progress(self: &Arc<Self>, total: usize) {
        let started_ms = now_ms();
        background::every(self, First::Now, SECOND, move |core| async move {
            let live: Vec<Arc<Live>> = core.live.lock().unwrap().values().cloned().collect();
            let pending = live
                .iter()
                .filter(|l| l.txn.lock().unwrap().created_ms < started_ms)
                .count();
            metrics::gauge!("twopc_recovery_pending_transactions").set(pending as f64);
            if pending == 0 {
                tracing::info!(total, "recovery finished");
                return Next::Done;
            }
            tracing::info!(
                finished = total.saturating_sub(pending),
                total,
                "recovery in progress"
            );
            Next::Again
        });
    }

    /// Asks every enlisted participant for our prepared branches and resolves those that no
    /// live transaction owns.
    pub async fn resolve_orphans(self: &Arc<Self>) -> Result<OrphanScan, Error> {
        let mut scan = OrphanScan::default();
        for (participant_id, endpoint) in self.log.participants()? {
            scan.participants += 1;
            // First the prepared list, then (per id, below) the live table: see the header.
            let ids = match self
                .participants
                .recover(&endpoint, self.limits.prepare_timeout)
                .await
            {
                Ok(ids) => ids,
                Err(e) => {
                    scan.unreachable += 1;
                    tracing::debug!(
                        participant_id,
                        endpoint,
                        error = %e,
                        "orphan scan: participant unreachable"
                    );
                    continue;
                }
            };
            let orphans: Vec<(TxnId, bool, u64)> = ids
                .into_iter()
                .filter(|id| self.live(*id).is_none())
                .map(|id| {
                    // No record: presumed abort.
                    Ok(match self.log.get(id)? {
                        Some(t) => (id, t.state.settled().is_commit(), t.xid_of(&participant_id)),
                        None => (id, false, 0),
                    })
                })
                .collect::<Result<_, Error>>()?;
            let results: Vec<(bool, Result<(), PeerError>)> = futures::stream::iter(orphans)
                .map(|(id, commit, xid)| {
                    let endpoint = endpoint.clone();
                    async move {
                        tracing::info!(txn_id = %id, endpoint, commit, "resolving an orphaned prepared branch");
                        let ending = match commit {
                            true => Ending::Commit,
                            false => Ending::RollBack {
                                reason: "an orphaned prepared branch: its transaction did not commit".into(),
                                sqlstate: String::new(),
                            },
                        };
                        let r = self
                            .participants
                            .finish(&endpoint, id, xid, &ending, self.limits.prepare_timeout)
                            .await;
                        (commit, r)
                    }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            for (commit, r) in results {
                match (commit, r) {
                    (true, Ok(())) => scan.committed += 1,
                    (false, Ok(())) => scan.rolled_back += 1,
                    (_, Err(e)) => {
                        scan.failed += 1;
                        tracing::warn!(
                            endpoint,
                            error = %e,
                            "orphan not resolved; next scan retries"
                        );
                    }
                }
            }
        }
        Ok(scan)
    }

    /// Scans for orphans now and then every `interval`, until the coordinator is dropped.
    pub fn spawn_orphan_scanner(self: &Arc<Self>, interval: std::time::Duration) {
        background::every(self, First::Now, interval, |core| async move {
            match core.resolve_orphans().await {
                Ok(scan) if scan.committed + scan.rolled_back + scan.failed > 0 => {
                    tracing::info!(?scan, "orphan scan")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "orphan scan failed"),
            }
            Next::Again
        });
    }

    /// Publishes the gauges an operator watches: transactions in flight, those decided but
    /// not yet finished (in doubt: some branch still holds a prepared transaction, or may),
    /// and how old the oldest of those is. Every second, until the coordinator is dropped.
    pub fn spawn_gauges(self: &Arc<Self>) {
        background::every(self, First::Now, SECOND, |core| async move {
            let live: Vec<Arc<Live>> = core.live.lock().unwrap().values().cloned().collect();
            let now = now_ms();
            let (mut in_doubt, mut oldest_ms) = (0usize, 0i64);
            for l in &live {
                let txn = l.txn.lock().unwrap();
                if matches!(
                    txn.state,
                    State::Committing | State::Aborting | State::OnePhase
                ) {
                    in_doubt += 1;
                    oldest_ms = oldest_ms.max(now - txn.decided_ms);
                }
            }
            metrics::gauge!("twopc_live_transactions").set(live.len() as f64);
            metrics::gauge!("twopc_in_doubt_transactions").set(in_doubt as f64);
            metrics::gauge!("twopc_oldest_in_doubt_seconds").set(oldest_ms as f64 / 1000.0);
            Next::Again
        });
    }
}
