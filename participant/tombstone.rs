//! How a participant remembers the branches that ended here, so that none is ever reopened.
//!
//! A transaction has one branch per participant. If a branch were forgotten the moment it
//! ended (rolled back by an operator, a stranger or its deadline; prepared and committed out
//! of turn), the transaction's next Execute would open a fresh one, the coordinator would take
//! the registration for a repeat after a lost reply, and a Commit could commit the later
//! statements without the earlier ones: half a transaction. So an ended branch leaves a
//! tombstone with its final state, which refuses statements and answers repeated protocol
//! requests as the branch would have.
//!
//! A tombstone is needed only while the coordinator could still take the transaction for
//! active: until its deadline, plus the participant's grace and a margin for clock skew. After
//! that the coordinator refuses any registration for it; after a participant restart it
//! refuses the new process (the registration's instance id). Tombstones are a few dozen bytes
//! each, swept in bulk so the hot path pays no timer per branch.

use super::branch::State;
use crate::proto::TxnId;
use std::collections::HashMap;

/// Tombstones are swept no more often than every this many insertions.
const SWEEP_MIN: usize = 1024;

/// The branches that ended here, each until its `until_ms`.
pub struct Tombstones {
    ended: HashMap<TxnId, Tombstone>,
    /// The size at which expired tombstones are swept out: twice the survivors of the last
    /// sweep, so sweeping costs O(1) per insertion.
    sweep_at: usize,
}

struct Tombstone {
    /// How the branch ended: `Committed`, `RolledBack` or `ReadOnly`.
    state: State,
    /// When the coordinator can no longer take the transaction for active (Unix ms).
    until_ms: i64,
}

impl Default for Tombstones {
    fn default() -> Self {
        Tombstones {
            ended: HashMap::new(),
            sweep_at: SWEEP_MIN,
        }
    }
}

impl Tombstones {
    /// Records that `txn`'s branch ended as `state`, unless `until_ms` has passed already.
    pub fn insert(&mut self, txn: TxnId, state: State, until_ms: i64, now_ms: i64) {
        if until_ms > now_ms {
            self.ended.insert(txn, Tombstone { state, until_ms });
        }
        if self.ended.len() >= self.sweep_at {
            self.ended.retain(|_, t| t.until_ms > now_ms);
            self.sweep_at = (self.ended.len() * 2).max(SWEEP_MIN);
        }
    }

    /// How `txn`'s branch ended, if it did so recently enough to be remembered.
    pub fn get(&self, txn: TxnId) -> Option<State> {
        self.ended.get(&txn).map(|t| t.state.clone())
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.ended.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_branch_is_remembered_with_its_state() {
        let mut t = Tombstones::default();
        let txn = TxnId::generate();

        t.insert(txn, State::RolledBack, 2_000, 1_000);

        assert_eq!(t.get(txn), Some(State::RolledBack));
        assert_eq!(t.get(TxnId::generate()), None);
    }

    #[test]
    fn a_branch_whose_transaction_is_long_over_leaves_no_tombstone() {
        let mut t = Tombstones::default();
        let txn = TxnId::generate();

        t.insert(txn, State::Committed, 1_000, 1_000);

        assert_eq!(t.get(txn), None);
    }

    #[test]
    fn expired_tombstones_are_swept_and_live_ones_kept() {
        let mut t = Tombstones::default();
        for _ in 0..SWEEP_MIN - 1 {
            t.insert(TxnId::generate(), State::Committed, 1_500, 1_000);
        }
        let live = TxnId::generate();

        // Time passes the first batch's horizon; the next insertion reaches the sweep size.
        t.insert(live, State::RolledBack, 9_000, 2_000);

        assert_eq!(t.remembered(), 1);
        assert_eq!(t.get(live), Some(State::RolledBack));
        for _ in 0..10 * SWEEP_MIN {
            t.insert(TxnId::generate(), State::Committed, 9_000, 2_000);
        }
        assert_eq!(
            t.remembered(),
            10 * SWEEP_MIN + 1,
            "live tombstones are never swept"
        );
    }
}
