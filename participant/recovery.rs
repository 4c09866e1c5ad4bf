//! Resolving in-doubt branches from the participant's side.
//!
//! A branch prepared in PostgreSQL holds its locks until someone commits or rolls it back. The
//! coordinator re-drives what it knows of; this covers the rest (a participant restarted, a
//! phase-2 message lost, a coordinator that came back without this branch in its log): at start
//! and then periodically, every gid of ours in `pg_prepared_xacts` is put to the coordinator with
//! `QueryOutcome` and the answer applied. PENDING means a commit is in flight: leave it. While
//! the coordinator is unreachable the branch stays prepared (no heuristic decisions: guessing
//! could break atomicity) and a warning names the gid and its age.
//!
//! Open branches (statements ran, never prepared) hold row locks too. Their deadline ends them,
//! but a coordinator that restarted may have forgotten their transaction well before that: the
//! same pass asks about those open longer than a pass interval, and rolls back the ones whose
//! transaction the coordinator says aborted.

use super::branches::{MARKER_RETENTION, Participant};
use super::database::{Database, PreparedBranch};
use super::gid::Gid;
use super::link::CoordinatorLink;
use crate::proto::Outcome;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub in_doubt: usize,
    pub committed: usize,
    pub rolled_back: usize,
    pub pending: usize,
    /// Another coordinator's branches (a shared database): left to their owner.
    pub foreign: usize,
    pub unresolved: usize,
}

/// How long one QueryOutcome may take: a hung coordinator must not stall the pass.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often one-phase markers past their retention are deleted.
const MARKER_PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

impl<D: Database, C: CoordinatorLink> Participant<D, C> {
    /// One pass over the prepared branches older than `min_age`.
    pub async fn resolve_in_doubt(&self, min_age: Duration) -> Result<Pass, super::error::Error> {
        let prepared = self.db.prepared_older_than(min_age).await?;
        let mut pass = Pass {
            in_doubt: prepared.len(),
            ..Pass::default()
        };
        let results: Vec<(Gid, f64, Result<Outcome, String>)> = futures::stream::iter(prepared)
            .map(|PreparedBranch { gid, age_s, xid }| async move {
                let asked = self
                    .coordinator
                    .query_outcome(gid.txn, &gid.coordinator_id, QUERY_TIMEOUT)
                    .await;
                let outcome = match asked {
                    // Another coordinator's branch in a shared database: not ours to resolve.
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                        Ok(Outcome::Unspecified)
                    }
                    Err(status) => Err(status.message().to_string()),
                    Ok(outcome) => {
                        let applied = match outcome {
                            Outcome::Committed => {
                                self.commit(gid.txn, xid, &gid.coordinator_id).await
                            }
                            Outcome::Aborted => {
                                self.rollback(gid.txn, xid, &gid.coordinator_id).await
                            }
                            _ => Ok(()),
                        };
                        applied.map(|()| outcome).map_err(|e| e.to_string())
                    }
                };
                (gid, age_s, outcome)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for (gid, age, result) in results {
            match result {
                Ok(Outcome::Committed) => pass.committed += 1,
                Ok(Outcome::Aborted) => pass.rolled_back += 1,
                Ok(Outcome::Unspecified) => pass.foreign += 1,
                Ok(_) => pass.pending += 1,
                Err(error) => {
                    pass.unresolved += 1;
                    tracing::warn!(%gid, age_s = age, error, "in-doubt branch stays prepared (holding its locks) until its coordinator answers");
                }
            }
        }
        Ok(pass)
    }

    /// Branches still open here (never prepared) after `min_age` whose transaction the
    /// coordinator says aborted are rolled back now, not at their deadline: they hold row
    /// locks, and their transaction can never commit. Typically a coordinator that restarted
    /// before anything durable was written for them answers ABORTED (presumed abort), where a
    /// live transaction answers PENDING. Returns how many were rolled back.
    pub async fn resolve_forgotten(&self, min_age: Duration) -> usize {
        let (open, Some(coordinator_id)) = self.open_for(min_age) else {
            return 0;
        };
        let coordinator_id = &coordinator_id;
        futures::stream::iter(open)
            .map(|txn| async move {
                let asked = self
                    .coordinator
                    .query_outcome(txn, coordinator_id, QUERY_TIMEOUT)
                    .await;
                if !matches!(asked, Ok(Outcome::Aborted)) {
                    return false;
                }
                match self.rollback(txn, 0, coordinator_id).await {
                    Ok(()) => {
                        tracing::info!(txn_id = %txn, "open branch of a transaction the coordinator says aborted: rolled back before its deadline");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(txn_id = %txn, error = %e, "rolling back an open branch of an aborted transaction failed; its deadline will");
                        false
                    }
                }
            })
            .buffer_unordered(32)
            .filter(|rolled_back| std::future::ready(*rolled_back))
            .count()
            .await
    }

    /// Runs passes now and every `interval` until the participant is dropped. Hourly, it
    /// also deletes the one-phase markers nobody said to forget, once past their retention.
    pub fn spawn_resolver(self: &Arc<Self>, interval: Duration) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            // The first pass takes every prepared branch: after a restart all of them are in
            // doubt. Later passes skip the young ones, which are normally mid-commit.
            let mut min_age = Duration::ZERO;
            let mut last_prune: Option<std::time::Instant> = None;
            loop {
                let Some(core) = this.upgrade() else { return };
                if last_prune.is_none_or(|t| t.elapsed() >= MARKER_PRUNE_INTERVAL) {
                    last_prune = Some(std::time::Instant::now());
                    match core.db.prune_one_phase_markers(MARKER_RETENTION).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(
                            markers = n,
                            "pruned one-phase markers past their retention"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "pruning one-phase markers failed; retrying in an hour")
                        }
                    }
                }
                match core.resolve_in_doubt(min_age).await {
                    Ok(pass) if pass.in_doubt > pass.foreign => {
                        tracing::info!(?pass, "in-doubt branches")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "in-doubt scan failed; retrying"),
                }
                core.resolve_forgotten(interval).await;
                drop(core);
                min_age = interval;
                tokio::time::sleep(interval).await;
            }
        });
    }
}
