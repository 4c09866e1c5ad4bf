//! The participants this coordinator has enlisted, as an operator sees them: where each is,
//! which process instance last registered a branch, when it was last heard from, and whether it
//! is healthy, which the coordinator checks itself (`grpc.health.v1`, every
//! `--health-check-interval-ms`), the way a service registry checks its services.
//!
//! Only the id → endpoint map is durable (the log's registry, which recovery asks for orphans);
//! the rest is what this process has seen since it started. The same map is the cache that lets
//! `RegisterBranch` skip the forced log write for a participant already enlisted at that
//! endpoint.

use super::log::Log;
use super::participants::Participants;
use super::transactions::{Coordinator, now_ms};
use super::txn::BranchState;
use crate::process::background::{self, First, Next};
use crate::proto::{self, ParticipantHealth};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a health check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// SERVING for `twopc.v1.Participant`.
    Serving,
    /// It answered, but not SERVING: why, for a person.
    NotServing(String),
    /// No answer: why.
    Unreachable(String),
}

impl Health {
    pub fn kind(&self) -> ParticipantHealth {
        match self {
            Health::Serving => ParticipantHealth::Serving,
            Health::NotServing(_) => ParticipantHealth::NotServing,
            Health::Unreachable(_) => ParticipantHealth::Unreachable,
        }
    }

    fn detail(&self) -> &str {
        match self {
            Health::Serving => "",
            Health::NotServing(why) | Health::Unreachable(why) => why,
        }
    }
}

/// One participant, as far as this process knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Where it last registered (and where it is in the durable registry).
    pub endpoint: String,
    /// The process instance that last registered a branch; empty: none since start.
    pub instance: String,
    /// When it was last heard from (a registration, a health check answered); 0: not yet.
    pub last_seen_ms: i64,
    /// The last health check's finding; None: not checked yet.
    pub health: Option<Health>,
    pub checked_ms: i64,
}

/// Every enlisted participant, by id.
#[derive(Debug, Default)]
pub struct Registry {
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl Registry {
    /// The registry as the log recorded it: (id, endpoint) pairs, nothing seen yet.
    pub fn new(enlisted: impl IntoIterator<Item = (String, String)>) -> Registry {
        let entries = enlisted
            .into_iter()
            .map(|(id, endpoint)| {
                (
                    id,
                    Entry {
                        endpoint,
                        ..Entry::default()
                    },
                )
            })
            .collect();
        Registry {
            entries: Mutex::new(entries),
        }
    }

    /// A branch registration from `id` at `endpoint`: notes the instance and the time, and
    /// says whether `id` is already enlisted at that endpoint (so the durable registry needs
    /// no write). A new endpoint is noted only by [`Registry::enlisted`], once it is durable.
    pub fn registering(&self, id: &str, endpoint: &str, instance: &str, now_ms: i64) -> bool {
        let mut entries = self.entries.lock().unwrap();
        match entries.get_mut(id) {
            Some(e) if e.endpoint == endpoint => {
                if e.instance != instance {
                    e.instance = instance.to_string();
                }
                e.last_seen_ms = now_ms;
                true
            }
            _ => false,
        }
    }

    /// `id` is durably enlisted at `endpoint` (new, or moved there).
    pub fn enlisted(&self, id: &str, endpoint: &str, instance: &str, now_ms: i64) {
        let mut entries = self.entries.lock().unwrap();
        let e = entries.entry(id.to_string()).or_default();
        if e.endpoint != endpoint {
            // Another address, another process: what was known of the old one says nothing.
            *e = Entry {
                endpoint: endpoint.to_string(),
                ..Entry::default()
            };
        }
        e.instance = instance.to_string();
        e.last_seen_ms = now_ms;
    }

    /// (id, endpoint) of every participant, to check.
    pub fn endpoints(&self) -> Vec<(String, String)> {
        let entries = self.entries.lock().unwrap();
        entries
            .iter()
            .map(|(id, e)| (id.clone(), e.endpoint.clone()))
            .collect()
    }

    /// A health check of `id` at `endpoint` found `health` (dropped if `id` moved meanwhile).
    /// Returns whether that is news: the first check, or another kind than the last.
    pub fn checked(&self, id: &str, endpoint: &str, health: Health, now_ms: i64) -> bool {
        let mut entries = self.entries.lock().unwrap();
        let Some(e) = entries.get_mut(id).filter(|e| e.endpoint == endpoint) else {
            return false;
        };
        if !matches!(health, Health::Unreachable(_)) {
            e.last_seen_ms = now_ms;
        }
        let news = e.health.as_ref().map(Health::kind) != Some(health.kind());
        e.health = Some(health);
        e.checked_ms = now_ms;
        news
    }

    pub fn snapshot(&self) -> BTreeMap<String, Entry> {
        self.entries.lock().unwrap().clone()
    }
}

/// How long one participant may take to answer a health check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

impl<L: Log, P: Participants> Coordinator<L, P> {
    /// Checks the health of every enlisted participant now, all at once.
    pub async fn check_participants(&self) {
        let endpoints = self.registry.endpoints();
        let found = futures::future::join_all(endpoints.iter().map(|(id, endpoint)| async move {
            let health = self.participants.health(endpoint, CHECK_TIMEOUT).await;
            (id, endpoint, health)
        }))
        .await;
        let now = now_ms();
        for (id, endpoint, health) in found {
            metrics::gauge!("twopc_participant_serving", "participant" => id.clone())
                .set(f64::from(u8::from(health == Health::Serving)));
            let (kind, detail) = (health.kind(), health.detail().to_string());
            if self.registry.checked(id, endpoint, health, now) {
                match kind {
                    ParticipantHealth::Serving => {
                        tracing::info!(participant_id = %id, %endpoint, "participant serving")
                    }
                    _ => {
                        tracing::warn!(participant_id = %id, %endpoint, health = kind.as_str_name(), detail, "participant not serving")
                    }
                }
            }
        }
    }

    /// Checks the participants' health every `interval`, until the coordinator is dropped.
    pub fn spawn_health_checks(self: &Arc<Self>, interval: Duration) {
        background::every(self, First::Now, interval, |core| async move {
            core.check_participants().await;
            Next::Again
        });
    }

    /// Every enlisted participant, with what this process knows of it and its branches in
    /// live transactions.
    pub fn list_participants(&self) -> Vec<proto::ParticipantInfo> {
        // participant id → (prepared, open), over the live transactions.
        let mut branches: HashMap<String, (u32, u32)> = HashMap::new();
        let live: Vec<_> = self.live.lock().unwrap().values().cloned().collect();
        for l in live {
            let txn = l.txn.lock().unwrap();
            for b in &txn.branches {
                let counts = branches.entry(b.participant_id.clone()).or_default();
                match b.state {
                    BranchState::Prepared => counts.0 += 1,
                    BranchState::Active => counts.1 += 1,
                    _ => {}
                }
            }
        }
        self.registry
            .snapshot()
            .into_iter()
            .map(|(id, e)| {
                let (health, detail) = e
                    .health
                    .as_ref()
                    .map_or((ParticipantHealth::Unknown, String::new()), |h| {
                        (h.kind(), h.detail().to_string())
                    });
                let (prepared, open) = branches.get(&id).copied().unwrap_or_default();
                proto::ParticipantInfo {
                    participant_id: id,
                    endpoint: e.endpoint,
                    instance_id: e.instance,
                    last_seen_unix_ms: e.last_seen_ms,
                    health: health as i32,
                    health_detail: detail,
                    health_checked_unix_ms: e.checked_ms,
                    prepared_branches: prepared,
                    open_branches: open,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_participant_registering_again_at_its_endpoint_needs_no_log_write() {
        let registry = Registry::new([("p1".to_string(), "http://a".to_string())]);

        assert!(registry.registering("p1", "http://a", "inst-1", 10));
        assert!(!registry.registering("p1", "http://b", "inst-2", 11));
        assert!(!registry.registering("p2", "http://c", "inst-3", 12));

        let p1 = &registry.snapshot()["p1"];
        assert_eq!((p1.instance.as_str(), p1.last_seen_ms), ("inst-1", 10));
    }

    #[test]
    fn a_participant_that_moved_starts_over_at_its_new_endpoint() {
        let registry = Registry::new([("p1".to_string(), "http://a".to_string())]);
        registry.checked("p1", "http://a", Health::Serving, 5);

        registry.enlisted("p1", "http://b", "inst-2", 20);

        let p1 = &registry.snapshot()["p1"];
        assert_eq!(p1.endpoint, "http://b");
        assert_eq!(
            p1.health, None,
            "the old endpoint's health says nothing of the new"
        );
        assert_eq!((p1.instance.as_str(), p1.last_seen_ms), ("inst-2", 20));
    }

    #[test]
    fn an_unreachable_participant_is_not_seen_and_a_stale_check_is_dropped() {
        let registry = Registry::new([("p1".to_string(), "http://a".to_string())]);
        assert!(registry.checked("p1", "http://a", Health::Serving, 5));
        assert!(!registry.checked("p1", "http://a", Health::Serving, 7));

        assert!(registry.checked("p1", "http://a", Health::Unreachable("refused".into()), 9));
        assert!(!registry.checked("p1", "http://old", Health::Serving, 10));

        let p1 = &registry.snapshot()["p1"];
        assert_eq!(p1.last_seen_ms, 7);
        assert_eq!(p1.health, Some(Health::Unreachable("refused".into())));
        assert_eq!(p1.checked_ms, 9);
    }
}
