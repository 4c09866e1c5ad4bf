//! Group commit for the decision log.
//!
//! `sled::Db::flush` is an fsync: milliseconds. Under load many commit decisions wait for it at
//! once, and one flush that starts after all of them were written covers them all. A dedicated
//! OS thread runs the flushes (not `flush_async` on the runtime: dozens of those at once hung a
//! 2-worker runtime in a test here), so async callers only wait on a watch channel.
//!
//! Tickets make "covers" exact: a caller writes its record, *then* takes a ticket, and is done
//! when the flushed ticket reaches its own. The thread reads the highest ticket before it
//! flushes, so that flush covers every record written before that ticket was taken.

use super::LogError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;
use tokio::sync::watch;

/// The group-commit thread and the tickets that say how far it has flushed.
pub struct Flusher {
    next_ticket: AtomicU64,
    /// `None` only while dropping.
    requests: Option<mpsc::Sender<u64>>,
    flushed: watch::Receiver<u64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    pub fn start(db: sled::Db) -> Self {
        let (requests, pending) = mpsc::channel::<u64>();
        let (flushed_tx, flushed) = watch::channel(0u64);
        let thread = std::thread::Builder::new()
            .name("twopc-log-flusher".into())
            .spawn(move || {
                // Ends when the log is dropped and every sender with it.
                while let Ok(mut ticket) = pending.recv() {
                    while let Ok(t) = pending.try_recv() {
                        ticket = ticket.max(t);
                    }
                    let started = Instant::now();
                    if let Err(e) = db.flush() {
                        // A failed fsync leaves the decision neither known durable nor known
                        // lost; carrying on could announce a commit the disk never saw. Stop,
                        // and let recovery read what the disk really holds.
                        tracing::error!(error = %e, "decision log flush failed; stopping the coordinator");
                        std::process::abort();
                    }
                    metrics::histogram!("twopc_log_flush_seconds").record(started.elapsed());
                    tracing::trace!(ticket, elapsed_us = started.elapsed().as_micros() as u64, "log flushed");
                    flushed_tx.send_if_modified(|flushed| advance(flushed, ticket));
                }
            })
            .expect("spawn the log flusher thread");
        Flusher {
            next_ticket: AtomicU64::new(0),
            requests: Some(requests),
            flushed,
            thread: Some(thread),
        }
    }

    /// Waits until everything written before this call is on disk.
    pub fn sync(&self) -> impl std::future::Future<Output = Result<(), LogError>> + Send + use<> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::SeqCst) + 1;
        let sent = self.requests.as_ref().map(|r| r.send(ticket));
        let mut flushed = self.flushed.clone();
        async move {
            if !matches!(sent, Some(Ok(()))) {
                return Err(LogError::Sled(sled::Error::ReportableBug(
                    "the log flusher thread is gone".into(),
                )));
            }
            flushed
                .wait_for(|&done| done >= ticket)
                .await
                .map(|_| ())
                .map_err(|_| {
                    LogError::Sled(sled::Error::ReportableBug(
                        "the log flusher thread is gone".into(),
                    ))
                })
        }
    }
}

/// Moves the flushed mark up to `ticket`; returns whether it moved. Never backwards: tickets
/// can reach the thread out of order (a caller may be preempted between taking its ticket and
/// sending it), and a flush for a lower ticket that lands after a higher one must not hide the
/// higher one from the callers still waiting on it: they would wait for the next flush, which
/// may never come.
fn advance(flushed: &mut u64, ticket: u64) -> bool {
    let moved = ticket > *flushed;
    *flushed = (*flushed).max(ticket);
    moved
}

impl Drop for Flusher {
    /// Waits for the thread, so the database (and its file lock) is closed on return: a
    /// coordinator restarted in the same process can reopen it at once.
    fn drop(&mut self) {
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::advance;

    #[test]
    fn the_flushed_mark_never_moves_back_for_a_late_lower_ticket() {
        let mut flushed = 0;
        assert!(advance(&mut flushed, 6));
        assert!(!advance(&mut flushed, 5));
        assert_eq!(flushed, 6);
        assert!(advance(&mut flushed, 7));
        assert_eq!(flushed, 7);
    }
}
