//! Reaching participants: one lazily connected gRPC channel per endpoint, shared by every
//! transaction that enlists it.

use super::txn::Vote;
use crate::proto::participant_client::ParticipantClient;
use crate::proto::{self, BranchRequest, PrepareRequest, TxnId};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

pub struct Participants {
    coordinator_id: String,
    channels: Mutex<HashMap<String, ParticipantClient<Channel>>>,
    connect_timeout: Duration,
}

impl Participants {
    pub fn new(coordinator_id: String, connect_timeout: Duration) -> Self {
        Participants {
            coordinator_id,
            channels: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    fn client(&self, endpoint: &str) -> Result<ParticipantClient<Channel>, tonic::Status> {
        let mut channels = self.channels.lock().unwrap();
        if let Some(c) = channels.get(endpoint) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| {
                tonic::Status::invalid_argument(format!(
                    "bad participant endpoint {endpoint:?}: {e}"
                ))
            })?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        let client = ParticipantClient::new(channel);
        channels.insert(endpoint.to_string(), client.clone());
        Ok(client)
    }

    /// Phase 1 for one branch. Anything but a clear yes or read-only is a no.
    pub async fn prepare(&self, endpoint: &str, txn: TxnId, timeout: Duration) -> Vote {
        crate::failpoint!("coordinator::prepare_sent");
        let call = async {
            let mut client = self.client(endpoint)?;
            let mut req = tonic::Request::new(PrepareRequest {
                txn_id: txn.to_string(),
                coordinator_id: self.coordinator_id.clone(),
            });
            req.set_timeout(timeout);
            trace(&mut req, txn);
            client.prepare(req).await.map(|r| r.into_inner())
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Vote::No {
                reason: format!("no vote from {endpoint} within {timeout:?}"),
            },
            Ok(Err(status)) => Vote::No {
                reason: format!("prepare at {endpoint} failed: {}", status.message()),
            },
            Ok(Ok(resp)) => match resp.vote() {
                proto::Vote::Yes => Vote::Yes { xid: resp.xid },
                proto::Vote::ReadOnly => Vote::ReadOnly,
                proto::Vote::No | proto::Vote::Unspecified => Vote::No {
                    reason: resp.reason,
                },
            },
        }
    }

    /// The txn ids of our branches prepared at `endpoint`.
    pub async fn recover(
        &self,
        endpoint: &str,
        timeout: Duration,
    ) -> Result<Vec<TxnId>, tonic::Status> {
        let mut client = self.client(endpoint)?;
        let mut req = tonic::Request::new(crate::proto::RecoverRequest {
            coordinator_id: self.coordinator_id.clone(),
        });
        req.set_timeout(timeout);
        let resp = tokio::time::timeout(timeout, client.recover(req))
            .await
            .map_err(|_| {
                tonic::Status::deadline_exceeded(format!(
                    "no answer from {endpoint} within {timeout:?}"
                ))
            })??;
        Ok(resp
            .into_inner()
            .txn_ids
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect())
    }

    /// Phase 2 for one branch: COMMIT PREPARED (`commit`) or a rollback.
    pub async fn finish(
        &self,
        endpoint: &str,
        txn: TxnId,
        xid: u64,
        commit: bool,
        timeout: Duration,
    ) -> Result<(), tonic::Status> {
        let mut client = self.client(endpoint)?;
        let mut req = tonic::Request::new(BranchRequest {
            txn_id: txn.to_string(),
            xid,
            coordinator_id: self.coordinator_id.clone(),
        });
        req.set_timeout(timeout);
        trace(&mut req, txn);
        let call = async {
            if commit {
                client.commit(req).await
            } else {
                client.rollback(req).await
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer from {endpoint} within {timeout:?}"
            ))),
            Ok(r) => r.map(|_| ()),
        }
    }
}

/// Carries the transaction's trace context to the participant (see `TxnId::traceparent`).
fn trace<T>(req: &mut tonic::Request<T>, txn: TxnId) {
    if let Ok(v) = txn.traceparent().parse() {
        req.metadata_mut().insert("traceparent", v);
    }
}
