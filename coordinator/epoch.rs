//! Who may create a transaction by enlisting in it (docs/PROTOCOL.md §12).
//!
//! A client that chooses its own txn id skips Begin: the first participant to enlist creates
//! the transaction. That is safe only if a transaction the coordinator has forgotten can never
//! be created again by a late branch, because the forgotten one's other branches are gone and
//! a Commit would commit the late branch alone. A coordinator forgets live transactions in two
//! ways, and each has its guard here:
//!
//! - **It restarts** (or another replica takes the lead) before the Active hint reached disk.
//!   Every start and every term has a new, larger **epoch**, durable before the coordinator
//!   serves; a client sends the epoch it learned with the id, so a transaction of an older
//!   epoch that is not in the log is refused instead of created.
//! - **It prunes** a finished record after the retention period. A transaction id is a
//!   UUIDv7: it says when it was made. Only ids made within the *window* of the coordinator's
//!   clock may create, and the window is at most half the retention, so an id old enough to
//!   have been pruned is too old to create.
//!
//! No I/O: the core asks [`admit`] with the clock and the log's answer in hand.

use crate::proto::TxnId;
use std::time::Duration;

/// Why a first enlistment may not create its transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "stale epoch: transaction {id} was started in epoch {theirs}, and this coordinator is in epoch {ours} (it restarted, or another replica leads, and has no record of it); start the transaction again with a new id and epoch {ours}"
    )]
    Stale { id: TxnId, theirs: u64, ours: u64 },
    #[error(
        "txn id {id} is not a UUIDv7: a client that chooses its own ids must make them as UUIDv7, whose time this coordinator checks"
    )]
    NotV7 { id: TxnId },
    #[error(
        "txn id {id} was made {skew_ms} ms {direction} this coordinator's clock, more than the {window_ms} ms a new transaction's id may be: make the id when the transaction starts (and check the client's clock)"
    )]
    OutOfWindow {
        id: TxnId,
        skew_ms: i64,
        direction: &'static str,
        window_ms: i64,
    },
}

/// How far from the coordinator's clock a new transaction's id may have been made: the
/// longest timeout, but at most half the retention of finished records (a pruned id must be
/// outside it whatever the clocks say; see the header).
pub fn window(max_timeout: Duration, retain_finished: Option<Duration>) -> Duration {
    match retain_finished {
        Some(retain) => max_timeout.min(retain / 2),
        None => max_timeout,
    }
}

/// May a first enlistment that names `epoch` create transaction `id`, which the log does not
/// hold, on a coordinator in epoch `current` whose clock says `now_ms`?
pub fn admit(
    id: TxnId,
    epoch: u64,
    current: u64,
    now_ms: i64,
    window: Duration,
) -> Result<(), Refusal> {
    if epoch != current {
        return Err(Refusal::Stale {
            id,
            theirs: epoch,
            ours: current,
        });
    }
    let made = match id.created_ms() {
        Some(made) if id.is_v7() => made,
        _ => return Err(Refusal::NotV7 { id }),
    };
    let window_ms = window.as_millis() as i64;
    let skew_ms = now_ms - made;
    if skew_ms.abs() > window_ms {
        return Err(Refusal::OutOfWindow {
            id,
            skew_ms: skew_ms.abs(),
            direction: if skew_ms > 0 { "before" } else { "after" },
            window_ms,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn id_made_at(ms: i64) -> TxnId {
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, (ms / 1000) as u64, 0);
        let id = uuid::Uuid::new_v7(ts);
        id.to_string().parse().unwrap()
    }

    #[test]
    fn an_id_of_the_current_epoch_made_now_creates() {
        let now = 1_800_000_000_000;
        assert_eq!(admit(id_made_at(now), 7, 7, now, HOUR), Ok(()));
    }

    #[test]
    fn an_older_epoch_is_refused_whatever_the_id() {
        let now = 1_800_000_000_000;
        let refused = admit(id_made_at(now), 6, 7, now, HOUR).unwrap_err();
        assert!(matches!(
            refused,
            Refusal::Stale {
                theirs: 6,
                ours: 7,
                ..
            }
        ));
        assert!(refused.to_string().contains("stale epoch"), "{refused}");
    }

    #[test]
    fn an_id_that_is_no_uuid_v7_is_refused() {
        let v4: TxnId = uuid::Uuid::new_v4().to_string().parse().unwrap();
        assert!(matches!(
            admit(v4, 7, 7, 1_800_000_000_000, HOUR),
            Err(Refusal::NotV7 { .. })
        ));
    }

    #[test]
    fn an_id_made_outside_the_window_is_refused_either_way() {
        let now = 1_800_000_000_000;
        let old = admit(id_made_at(now - 2 * 3_600_000), 7, 7, now, HOUR).unwrap_err();
        assert!(old.to_string().contains("before"), "{old}");
        let ahead = admit(id_made_at(now + 2 * 3_600_000), 7, 7, now, HOUR).unwrap_err();
        assert!(ahead.to_string().contains("after"), "{ahead}");
    }

    #[test]
    fn the_window_is_at_most_half_the_retention_so_a_pruned_id_cannot_create() {
        assert_eq!(window(HOUR, Some(24 * HOUR)), HOUR);
        assert_eq!(window(HOUR, Some(HOUR)), HOUR / 2);
        assert_eq!(window(HOUR, None), HOUR);
    }
}
