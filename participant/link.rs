//! The participant's line to its coordinator: enlisting a branch, and asking how an in-doubt
//! one ended.
//!
//! Behind [`CoordinatorLink`] so the branch table and the resolver run against an in-memory
//! coordinator in tests; [`GrpcCoordinator`] is the real one.

use crate::process::auth::Bearer;
use crate::process::leader_channel::LeaderChannel;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::{self, Outcome, RegisterBranchRequest, Start, TxnId};
use std::future::Future;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;

/// The coordinator's answer to RegisterBranch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enlisted {
    /// The coordinator's stable id: it names the branch's gid.
    pub coordinator_id: String,
    /// When the coordinator aborts the transaction if it is still active (Unix ms).
    pub deadline_ms: i64,
}

/// What a participant asks of its coordinator. Errors are the coordinator's own statuses (or
/// transport failures), so the participant can pass a refusal on to its client as it came.
pub trait CoordinatorLink: Send + Sync + 'static {
    /// Enlists this participant's branch of `txn`. `instance` names this process: a restarted
    /// participant has lost its open branches and must not be taken for the old one.
    /// `one_phase`: this participant can commit the branch in one phase if it is the only one.
    /// `start`: the client chose the txn id itself, and this enlistment may create it.
    fn register(
        &self,
        txn: TxnId,
        start: Option<&Start>,
        participant_id: &str,
        endpoint: &str,
        instance: &str,
        one_phase: bool,
    ) -> impl Future<Output = Result<Enlisted, tonic::Status>> + Send;

    /// How the transaction of an in-doubt branch ended, by the coordinator that owns it.
    /// FAILED_PRECONDITION: it is not that coordinator's.
    fn query_outcome(
        &self,
        txn: TxnId,
        coordinator_id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<Outcome, tonic::Status>> + Send;
}

/// The coordinator reached over gRPC.
#[derive(Clone)]
pub struct GrpcCoordinator {
    client: CoordinatorClient<InterceptedService<LeaderChannel, Bearer>>,
}

impl GrpcCoordinator {
    /// `bearer`: this participant's peer token, on every call.
    pub fn new(channel: LeaderChannel, bearer: Bearer) -> Self {
        GrpcCoordinator {
            client: CoordinatorClient::with_interceptor(channel, bearer),
        }
    }
}

impl CoordinatorLink for GrpcCoordinator {
    async fn register(
        &self,
        txn: TxnId,
        start: Option<&Start>,
        participant_id: &str,
        endpoint: &str,
        instance: &str,
        one_phase: bool,
    ) -> Result<Enlisted, tonic::Status> {
        let mut req = tonic::Request::new(RegisterBranchRequest {
            txn_id: txn.to_string(),
            participant_id: participant_id.to_string(),
            endpoint: endpoint.to_string(),
            instance_id: instance.to_string(),
            one_phase,
            epoch: start.map_or(0, |s| s.epoch),
            timeout_ms: start.map_or(0, |s| s.timeout_ms),
            label: start.map(|s| s.label.clone()).unwrap_or_default(),
        });
        if let Ok(v) = txn.traceparent().parse() {
            req.metadata_mut().insert("traceparent", v);
        }
        let resp = self.client.clone().register_branch(req).await?.into_inner();
        Ok(Enlisted {
            coordinator_id: resp.coordinator_id,
            deadline_ms: resp.deadline_unix_ms,
        })
    }

    async fn query_outcome(
        &self,
        txn: TxnId,
        coordinator_id: &str,
        timeout: Duration,
    ) -> Result<Outcome, tonic::Status> {
        let mut req = tonic::Request::new(proto::QueryOutcomeRequest {
            txn_id: txn.to_string(),
            coordinator_id: coordinator_id.to_string(),
        });
        req.set_timeout(timeout);
        tokio::time::timeout(timeout, self.client.clone().query_outcome(req))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer")))
            .map(|r| r.into_inner().outcome())
    }
}
