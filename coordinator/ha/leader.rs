//! Which coordinator replica leads: the one whose etcd lease holds the leader key.
//!
//! A replica campaigns by creating `<prefix>leader` (its address as the value) under a lease of
//! its own, only if the key does not exist. The winner renews the lease every third of its TTL;
//! the others watch the key and try again when it is deleted, which etcd does when the
//! leader's lease lapses (it died, froze or lost etcd) or when it resigns on shutdown.
//!
//! Two guards keep a deposed leader harmless, and neither trusts its clock alone:
//! - every log write is conditioned on the key's create revision (the [`Fence`]), so once
//!   another replica created the key anew, etcd refuses the old leader's writes;
//! - the leader counts its lease from the moment it *sent* the last successful renewal, which
//!   is never later than etcd counts it, and stops answering the moment that runs out
//!   ([`LeaseCheck`]), then stops altogether ([`Leadership::deposed`]).

use crate::coordinator::log::Fence;
use etcd_client::{
    Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What a replica that does not lead knows: who does (their advertised URL), and why this one
/// does not.
#[derive(Clone, Debug)]
pub struct Candidacy {
    pub leader: Option<String>,
    pub why: String,
}

/// One replica's campaign for the leader key.
pub struct Election {
    pub client: Client,
    /// `<prefix>leader`.
    pub key: String,
    /// The URL clients should be sent to while this replica leads.
    pub advertise: String,
    /// The lease's time to live: how long the cluster may stay leaderless after the leader dies.
    pub lease_ttl: Duration,
}

/// Until when this replica may act as leader; shared by the renewing task and every request.
#[derive(Clone)]
pub struct LeaseCheck(Arc<Mutex<Instant>>);

impl LeaseCheck {
    /// Whether the lease is certainly still held (by this replica's count, which runs ahead of
    /// etcd's).
    pub fn valid(&self) -> bool {
        Instant::now() < *self.0.lock().unwrap()
    }

    fn extend(&self, until: Instant) {
        let mut valid_until = self.0.lock().unwrap();
        *valid_until = (*valid_until).max(until);
    }
}

/// This replica leads: its fence, its lease, and the task that renews it.
pub struct Leadership {
    pub fence: Fence,
    lease: i64,
    check: LeaseCheck,
    deposed: watch::Receiver<Option<String>>,
    renewing: tokio::task::JoinHandle<()>,
    client: Client,
}

impl Leadership {
    pub fn check(&self) -> LeaseCheck {
        self.check.clone()
    }

    /// Returns, with the reason, once this replica may no longer lead.
    pub async fn deposed(&mut self) -> String {
        match self.deposed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the lease renewal task stopped".into(),
        }
    }

    /// Gives the lead up now (revoking the lease deletes the key), so another replica takes
    /// over at once rather than after the TTL.
    pub async fn resign(mut self) {
        self.renewing.abort();
        let revoked =
            tokio::time::timeout(Duration::from_secs(2), self.client.lease_revoke(self.lease))
                .await;
        if !matches!(revoked, Ok(Ok(_))) {
            tracing::warn!(
                "could not revoke the leader lease; another replica takes over when it lapses"
            );
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewing.abort();
    }
}

/// How one attempt went.
enum Attempt {
    Won(Box<Leadership>),
    /// Someone else holds the key, created at this revision.
    Lost {
        leader: String,
        revision: i64,
    },
}

impl Election {
    /// Campaigns until this replica leads. `report` hears, on every change, who leads and why
    /// this replica does not (etcd unreachable, another replica leads).
    pub async fn win(&self, mut report: impl FnMut(Candidacy)) -> Leadership {
        loop {
            match self.attempt().await {
                Ok(Attempt::Won(leadership)) => return *leadership,
                Ok(Attempt::Lost { leader, revision }) => {
                    tracing::info!(%leader, "another coordinator replica leads; standing by");
                    report(Candidacy {
                        leader: Some(leader),
                        why: "another replica leads".into(),
                    });
                    self.wait_for_vacancy(revision).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot campaign for leadership: etcd unreachable");
                    report(Candidacy {
                        leader: None,
                        why: format!("etcd is unreachable ({e})"),
                    });
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn attempt(&self) -> Result<Attempt, etcd_client::Error> {
        let mut client = self.client.clone();
        let asked = Instant::now();
        let ttl_secs = self.lease_ttl.as_secs_f64().ceil().max(1.0) as i64;
        let lease = client.lease_grant(ttl_secs, None).await?.id();
        let campaign = Txn::new()
            .when([Compare::create_revision(
                self.key.as_bytes(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                self.key.as_bytes(),
                self.advertise.as_bytes(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(self.key.as_bytes(), None)]);
        let reply = client.txn(campaign).await?;
        if !reply.succeeded() {
            let _ = client.lease_revoke(lease).await;
            let held = reply.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| {
                    (
                        String::from_utf8_lossy(kv.value()).into_owned(),
                        kv.create_revision(),
                    )
                }),
                _ => None,
            });
            // Gone between the compare and the get is impossible in one transaction, but an
            // empty answer costs nothing to handle: try again.
            let (leader, revision) = held.unwrap_or_default();
            return Ok(Attempt::Lost { leader, revision });
        }
        let revision = reply.header().map_or(0, |h| h.revision());
        let check = LeaseCheck(Arc::new(Mutex::new(asked + margin(self.lease_ttl))));
        let (depose, deposed) = watch::channel(None);
        let renewing = tokio::spawn(renew(
            self.client.clone(),
            lease,
            self.lease_ttl,
            check.clone(),
            depose,
        ));
        tracing::info!(key = %self.key, revision, lease, "this coordinator replica leads");
        Ok(Attempt::Won(Box::new(Leadership {
            fence: Fence {
                key: self.key.clone(),
                revision,
            },
            lease,
            check,
            deposed,
            renewing,
            client: self.client.clone(),
        })))
    }

    /// Returns once the key created at `revision` is deleted (or, to be safe against a stalled
    /// watch, after two TTLs).
    async fn wait_for_vacancy(&self, revision: i64) {
        let mut client = self.client.clone();
        let watching = async {
            let mut stream = client
                .watch(
                    self.key.as_bytes(),
                    Some(WatchOptions::new().with_start_revision(revision + 1)),
                )
                .await?;
            while let Some(reply) = stream.message().await? {
                if reply
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
                {
                    return Ok(());
                }
            }
            Ok::<(), etcd_client::Error>(())
        };
        // A broken watch: pause before the next attempt rather than spin.
        if let Ok(Err(_)) = tokio::time::timeout(self.lease_ttl * 2, watching).await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// How long after sending a renewal the leader may count on it: the TTL less a tenth, for
/// scheduling delays on this side.
fn margin(ttl: Duration) -> Duration {
    ttl - ttl / 10
}

/// Renews the lease every third of its TTL until it cannot, then reports why. A failed renewal
/// (an etcd member died under the stream, say) is tried again after [`RETRY`] on a fresh stream,
/// which the client may open to another member, as long as the lease lasts.
async fn renew(
    client: Client,
    lease: i64,
    ttl: Duration,
    check: LeaseCheck,
    depose: watch::Sender<Option<String>>,
) {
    const RETRY: Duration = Duration::from_millis(100);
    let mut lease_client = client.lease_client();
    let mut channel = None;
    let mut next = tokio::time::Instant::now() + ttl / 3;
    loop {
        tokio::time::sleep_until(next).await;
        if !check.valid() {
            depose.send_replace(Some(format!(
                "the leader lease was not renewed within {ttl:?} (etcd unreachable, or this process was paused)"
            )));
            return;
        }
        let sent = Instant::now();
        let renewed = tokio::time::timeout(ttl / 4, async {
            if channel.is_none() {
                channel = Some(lease_client.keep_alive(lease).await?);
            }
            let (keeper, stream) = channel.as_mut().expect("opened above");
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match renewed {
            Ok(Ok(Some(reply))) if reply.ttl() > 0 => {
                check.extend(sent + margin(ttl));
                next = tokio::time::Instant::now() + ttl / 3;
            }
            Ok(Ok(Some(_))) => {
                depose.send_replace(Some("etcd says the leader lease has expired".into()));
                return;
            }
            other => {
                tracing::warn!(outcome = ?other.map(|r| r.map(|_| ())), "leader lease renewal failed; retrying");
                channel = None;
                next = tokio::time::Instant::now() + RETRY;
            }
        }
    }
}
