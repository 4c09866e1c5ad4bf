//! Background work that lives as long as its owner: a pass run every so often (recovery's
//! progress, the orphan scan, the gauges, the deadlock detector, health checks, pruning).
//!
//! Between passes the loop holds only a weak handle, so dropping the last `Arc` of the owner
//! (a coordinator shut down, or a scenario's simulated crash) ends the loop instead of keeping
//! a dead process's state alive; during a pass it holds the owner, so a pass is never cut in
//! the middle by that drop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// What a pass says about the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Run again after the interval.
    Again,
    /// The work is done: the loop ends.
    Done,
}

/// When the first pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum First {
    Now,
    AfterInterval,
}

/// Runs `pass` on `owner` every `interval` (after each pass ends), starting as `first` says,
/// until the owner is dropped or a pass answers [`Next::Done`].
pub fn every<T, F, Fut>(owner: &Arc<T>, first: First, interval: Duration, mut pass: F)
where
    T: Send + Sync + 'static,
    F: FnMut(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = Next> + Send,
{
    let owner = Arc::downgrade(owner);
    tokio::spawn(async move {
        if first == First::AfterInterval {
            tokio::time::sleep(interval).await;
        }
        loop {
            let Some(owner) = owner.upgrade() else { return };
            if pass(owner).await == Next::Done {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn the_loop_ends_when_its_owner_is_dropped() {
        let owner = Arc::new(AtomicUsize::new(0));
        every(&owner, First::Now, Duration::from_secs(1), |o| async move {
            o.fetch_add(1, Ordering::SeqCst);
            Next::Again
        });
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(owner.load(Ordering::SeqCst), 3);
        let weak = Arc::downgrade(&owner);
        drop(owner);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(weak.upgrade().is_none(), "the loop kept its owner alive");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_that_is_done_ends_the_loop() {
        let owner = Arc::new(AtomicUsize::new(0));
        every(
            &owner,
            First::AfterInterval,
            Duration::from_secs(1),
            |o| async move {
                match o.fetch_add(1, Ordering::SeqCst) {
                    0 => Next::Again,
                    _ => Next::Done,
                }
            },
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(owner.load(Ordering::SeqCst), 2);
    }
}
