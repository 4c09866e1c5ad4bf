//! Distributed deadlocks: cycles in the global wait-for graph, and the transaction to abort to
//! break each. No I/O: `detector.rs` gathers the waits from the participants and aborts the
//! victims chosen here.
//!
//! Each participant sees only its own database: T1 waiting for T2 in database A and T2 waiting
//! for T1 in database B is a cycle no PostgreSQL can see, so without this both would wait until
//! their deadline. A cycle inside one database is PostgreSQL's own to break (its
//! `deadlock_timeout`), so only cycles whose waits span two or more participants count here.
//!
//! The rule for the victim: the youngest transaction in the cycle that is still Active (the
//! largest txn id: ids are UUIDv7, ordered by Begin). It has most likely done the least work,
//! and the rule is one a person can predict. A transaction that is preparing or decided is never
//! a victim: its outcome is not ours to change (and it waits for no lock of its own asking).
//! A victim's retry is a new, younger transaction, so a client whose work keeps crossing busier
//! clients' can lose again and again (docs/PROTOCOL.md §11).

use crate::proto::{self, TxnId};
use std::collections::{BTreeMap, BTreeSet};

/// One wait between two global transactions, on one participant's database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    pub participant: String,
    pub waiter: TxnId,
    pub holder: TxnId,
    pub waited_ms: u32,
    pub lock: String,
}

impl Edge {
    /// The edge a participant's report stands for: `None` when the holder is not a global
    /// transaction (another session, a prepared transaction of unknown owner), which no cycle
    /// of ours can pass through, or when the report does not parse.
    pub fn from_wait(w: &proto::LockWait) -> Option<Edge> {
        Some(Edge {
            participant: w.participant_id.clone(),
            waiter: w.waiter_txn_id.parse().ok()?,
            holder: w.holder_txn_id.parse().ok()?,
            waited_ms: w.waited_ms,
            lock: w.lock.clone(),
        })
    }
}

/// A transaction to abort, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Victim {
    pub txn: TxnId,
    /// The other transactions of the cycle (strictly: of its strongly connected component).
    pub others: Vec<TxnId>,
    /// For the victim's client, and the log.
    pub reason: String,
    /// How long the cycle has existed at least: the age of its youngest wait.
    pub formed_ms: u32,
}

/// The victims that break every cycle spanning two or more participants, one per cycle.
/// `active`: whether a transaction may be aborted (it is still Active).
pub fn victims(edges: &[Edge], active: impl Fn(TxnId) -> bool) -> Vec<Victim> {
    let mut edges: Vec<&Edge> = edges.iter().filter(|e| e.waiter != e.holder).collect();
    let mut chosen = Vec::new();
    loop {
        let Some(component) = components(&edges)
            .into_iter()
            .find(|c| spans_participants(&edges, c))
        else {
            return chosen;
        };
        let inside: Vec<&Edge> = edges
            .iter()
            .copied()
            .filter(|e| component.contains(&e.waiter) && component.contains(&e.holder))
            .collect();
        match component.iter().rev().copied().find(|t| active(*t)) {
            Some(txn) => {
                chosen.push(victim(txn, &component, &inside));
                edges.retain(|e| e.waiter != txn && e.holder != txn);
            }
            // Nobody in it may be aborted: it ends when the transactions that are preparing
            // finish, or at a deadline. Set it aside and look at the rest.
            None => edges.retain(|e| !inside.contains(e)),
        }
    }
}

fn victim(txn: TxnId, component: &BTreeSet<TxnId>, inside: &[&Edge]) -> Victim {
    let others: Vec<TxnId> = component.iter().copied().filter(|t| *t != txn).collect();
    let waits: Vec<String> = inside
        .iter()
        .filter(|e| e.waiter == txn)
        .map(|e| format!("for {} on {} ({})", e.holder, e.participant, e.lock))
        .collect();
    let others_text: Vec<String> = others.iter().map(TxnId::to_string).collect();
    Victim {
        txn,
        reason: format!(
            "distributed deadlock (SQLSTATE 40P01): transaction {txn} waited {} in a cycle with {}; it was aborted as the youngest transaction in the cycle, the others go on",
            waits.join(" and "),
            others_text.join(", ")
        ),
        others,
        formed_ms: inside.iter().map(|e| e.waited_ms).min().unwrap_or(0),
    }
}

/// Whether the waits inside `component` come from two or more participants.
fn spans_participants(edges: &[&Edge], component: &BTreeSet<TxnId>) -> bool {
    let participants: BTreeSet<&str> = edges
        .iter()
        .filter(|e| component.contains(&e.waiter) && component.contains(&e.holder))
        .map(|e| e.participant.as_str())
        .collect();
    component.len() > 1 && participants.len() > 1
}

/// The strongly connected components of the graph with two or more transactions (Tarjan's
/// algorithm): every cycle lies within one.
fn components(edges: &[&Edge]) -> Vec<BTreeSet<TxnId>> {
    let mut next: BTreeMap<TxnId, Vec<TxnId>> = BTreeMap::new();
    for e in edges {
        next.entry(e.waiter).or_default().push(e.holder);
        next.entry(e.holder).or_default();
    }
    let mut t = Tarjan {
        next: &next,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for &node in next.keys() {
        if !t.index.contains_key(&node) {
            t.visit(node);
        }
    }
    t.found
}

struct Tarjan<'a> {
    next: &'a BTreeMap<TxnId, Vec<TxnId>>,
    index: BTreeMap<TxnId, usize>,
    low: BTreeMap<TxnId, usize>,
    stack: Vec<TxnId>,
    on_stack: BTreeSet<TxnId>,
    found: Vec<BTreeSet<TxnId>>,
}

impl Tarjan<'_> {
    // Recursive: a wait-for graph is as deep as a chain of waiting transactions, which the
    // live-transaction limit bounds and real systems keep short.
    fn visit(&mut self, node: TxnId) {
        let i = self.index.len();
        self.index.insert(node, i);
        self.low.insert(node, i);
        self.stack.push(node);
        self.on_stack.insert(node);
        for &to in &self.next[&node] {
            if !self.index.contains_key(&to) {
                self.visit(to);
                let low = self.low[&node].min(self.low[&to]);
                self.low.insert(node, low);
            } else if self.on_stack.contains(&to) {
                let low = self.low[&node].min(self.index[&to]);
                self.low.insert(node, low);
            }
        }
        if self.low[&node] == self.index[&node] {
            let mut component = BTreeSet::new();
            while let Some(top) = self.stack.pop() {
                self.on_stack.remove(&top);
                component.insert(top);
                if top == node {
                    break;
                }
            }
            if component.len() > 1 {
                self.found.push(component);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transactions in Begin order: `ids[0]` is the oldest.
    fn ids(n: usize) -> Vec<TxnId> {
        let mut ids: Vec<TxnId> = (0..n).map(|_| TxnId::generate()).collect();
        ids.sort();
        ids
    }

    fn wait(participant: &str, waiter: TxnId, holder: TxnId) -> Edge {
        Edge {
            participant: participant.into(),
            waiter,
            holder,
            waited_ms: 400,
            lock: "transactionid (ShareLock)".into(),
        }
    }

    #[test]
    fn a_cycle_across_two_databases_loses_its_youngest_transaction() {
        let t = ids(2);
        let edges = [wait("a", t[1], t[0]), wait("b", t[0], t[1])];

        let victims = victims(&edges, |_| true);

        assert_eq!(victims.len(), 1);
        assert_eq!(victims[0].txn, t[1]);
        assert_eq!(victims[0].others, vec![t[0]]);
        let reason = &victims[0].reason;
        assert!(
            reason.contains("40P01")
                && reason.contains(&t[0].to_string())
                && reason.contains(" on a "),
            "{reason}"
        );
    }

    #[test]
    fn a_three_database_cycle_is_broken_once() {
        let t = ids(3);
        let edges = [
            wait("a", t[0], t[1]),
            wait("b", t[1], t[2]),
            wait("c", t[2], t[0]),
        ];

        let victims = victims(&edges, |_| true);

        assert_eq!(
            victims.iter().map(|v| v.txn).collect::<Vec<_>>(),
            vec![t[2]]
        );
        assert_eq!(victims[0].others, vec![t[0], t[1]]);
    }

    #[test]
    fn waits_that_form_no_cycle_are_left_alone() {
        let t = ids(3);
        let chain = [wait("a", t[0], t[1]), wait("b", t[1], t[2])];

        assert!(victims(&chain, |_| true).is_empty());
    }

    #[test]
    fn a_cycle_inside_one_database_is_left_to_postgresql() {
        let t = ids(2);
        let edges = [wait("a", t[0], t[1]), wait("a", t[1], t[0])];

        assert!(victims(&edges, |_| true).is_empty());
    }

    #[test]
    fn a_transaction_that_is_preparing_is_never_the_victim() {
        let t = ids(2);
        let edges = [wait("a", t[1], t[0]), wait("b", t[0], t[1])];

        let victims = victims(&edges, |id| id != t[1]);

        assert_eq!(
            victims.iter().map(|v| v.txn).collect::<Vec<_>>(),
            vec![t[0]]
        );
    }

    #[test]
    fn a_cycle_with_no_active_transaction_is_set_aside_and_others_still_broken() {
        let t = ids(4);
        let edges = [
            wait("a", t[0], t[1]),
            wait("b", t[1], t[0]),
            wait("a", t[2], t[3]),
            wait("b", t[3], t[2]),
        ];

        let victims = victims(&edges, |id| id == t[2] || id == t[3]);

        assert_eq!(
            victims.iter().map(|v| v.txn).collect::<Vec<_>>(),
            vec![t[3]]
        );
    }

    #[test]
    fn two_cycles_sharing_a_transaction_need_only_that_one() {
        let t = ids(3);
        // t2 is in both cycles, and the youngest.
        let edges = [
            wait("a", t[0], t[2]),
            wait("b", t[2], t[0]),
            wait("a", t[1], t[2]),
            wait("b", t[2], t[1]),
        ];

        let victims = victims(&edges, |_| true);

        assert_eq!(
            victims.iter().map(|v| v.txn).collect::<Vec<_>>(),
            vec![t[2]]
        );
    }

    #[test]
    fn the_cycle_is_as_old_as_its_youngest_wait() {
        let t = ids(2);
        let mut edges = [wait("a", t[1], t[0]), wait("b", t[0], t[1])];
        edges[0].waited_ms = 900;
        edges[1].waited_ms = 350;

        assert_eq!(victims(&edges, |_| true)[0].formed_ms, 350);
    }
}
