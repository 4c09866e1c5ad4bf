//! Wall-clock time as the protocol records it: Unix milliseconds.
//!
//! The state machines never read the clock; their drivers pass `now_ms()` in, so a test can
//! replay any interleaving with the times it chooses. Deadlines travel between processes as
//! Unix ms (Begin's answer, RegisterBranch's), which is why this is wall-clock, not monotonic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How long until the Unix-ms instant `at_ms`; zero if it has passed.
pub fn until(at_ms: i64) -> Duration {
    Duration::from_millis((at_ms - now_ms()).max(0) as u64)
}
