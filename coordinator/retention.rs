//! Retention: the decision log would otherwise keep every transaction forever.
//!
//! Once a transaction has finished (every branch acknowledged), its record is needed only to
//! answer GetTransaction and repeated Commit/Abort calls, so it can go after a while: then those
//! answer NOT_FOUND, and QueryOutcome presumes abort, which is safe because no branch of a
//! finished transaction is still prepared. The one exception, a transaction an operator
//! forced, is never pruned (see `Log::prune`).
//!
//! Final sagas go after the same time, once every participant of their SQL steps has forgotten
//! their barrier rows (`Coordinator::prune_sagas`); an unfinished or stuck saga never goes.

use super::log::Log;
use super::participants::Participants;
use super::transactions::{Coordinator, now_ms};
use crate::process::background::{self, First, Next};
use std::sync::Arc;
use std::time::Duration;

/// How often the pruner looks.
const EVERY: Duration = Duration::from_secs(3600);

impl<L: Log, P: Participants> Coordinator<L, P> {
    /// Prunes records finished more than `retain` ago, now and every hour, until the
    /// coordinator is dropped.
    pub fn spawn_pruner(self: &Arc<Self>, retain: Duration) {
        background::every(self, First::Now, EVERY, move |core| async move {
            let before = now_ms() - retain.as_millis() as i64;
            match core.log.prune(before) {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "pruned finished transactions from the log"),
                Err(e) => tracing::warn!(error = %e, "pruning the log failed; will retry"),
            }
            match core.prune_sagas(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sagas = n, "pruned finished sagas and their barrier rows"),
                Err(e) => tracing::warn!(error = %e, "pruning sagas failed; will retry"),
            }
            Next::Again
        });
    }
}
