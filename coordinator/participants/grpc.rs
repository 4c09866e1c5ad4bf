//! Participants over gRPC: one lazily connected channel per endpoint, shared by every
//! transaction that enlists it, and on it one Phases stream that carries the phase calls of
//! every transaction (`phase_stream.rs`), or unary calls to a participant that serves none.

use super::phase_stream::{CallError, PhaseStreams};
use super::{Ending, Participants, PeerError, ServiceCall};
use crate::coordinator::marker_key::MarkerKey;
use crate::coordinator::registry::Health;
use crate::process::auth::Bearer;
use crate::process::leader_channel::{PING_EVERY, PING_TIMEOUT};
use crate::process::tls::Tls;
use crate::proto::participant_client::ParticipantClient;
use crate::proto::phase_reply::Result as Reply;
use crate::proto::phase_request::Step;
use crate::proto::vote::OnePhaseOutcome;
use crate::proto::vote::Vote;
use crate::proto::{
    BranchRequest, CommitOnePhaseRequest, LockWait, PrepareRequest, SagaStepRequest,
    SagaStepResponse, TxnId, WaitsRequest,
};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The service whose health a participant reports (it is NOT_SERVING while it cannot reach
/// its PostgreSQL or this coordinator).
const PARTICIPANT_SERVICE: &str = "twopc.v1.Participant";

/// The participants reached over gRPC, as the coordinator named `coordinator_id`.
pub struct GrpcParticipants {
    /// Sent with every request: a participant acts only on gids of the coordinator that asks.
    coordinator_id: String,
    /// One-phase markers' secrets come from it.
    marker_key: MarkerKey,
    /// One channel per endpoint; tonic channels multiplex every call over one connection.
    channels: Mutex<HashMap<String, Channel>>,
    connect_timeout: Duration,
    tls: Tls,
    /// This coordinator's peer token, on every call.
    bearer: Bearer,
    /// Prepare, Commit, Rollback and CommitOnePhase, over one stream per participant.
    pub(super) phases: PhaseStreams,
}

pub(super) type Client = ParticipantClient<InterceptedService<Channel, Bearer>>;

impl GrpcParticipants {
    pub fn new(
        coordinator_id: String,
        marker_key: MarkerKey,
        connect_timeout: Duration,
        tls: Tls,
        bearer: Bearer,
    ) -> Self {
        GrpcParticipants {
            coordinator_id,
            marker_key,
            channels: Mutex::new(HashMap::new()),
            connect_timeout,
            tls,
            bearer,
            phases: PhaseStreams::default(),
        }
    }

    fn channel(&self, endpoint: &str) -> Result<Channel, tonic::Status> {
        let mut channels = self.channels.lock().unwrap();
        if let Some(c) = channels.get(endpoint) {
            return Ok(c.clone());
        }
        let channel = self
            .tls
            .endpoint(endpoint)
            .map_err(|e| tonic::Status::invalid_argument(format!("participant endpoint {e}")))?
            .connect_timeout(self.connect_timeout)
            // A Phases stream stays open for as long as the participant serves: without pings,
            // one whose peer vanished without a reset would never be replaced.
            .http2_keep_alive_interval(PING_EVERY)
            .keep_alive_timeout(PING_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(endpoint.to_string(), channel.clone());
        Ok(channel)
    }

    fn client(&self, endpoint: &str) -> Result<Client, tonic::Status> {
        let channel = self.channel(endpoint)?;
        Ok(ParticipantClient::with_interceptor(
            channel,
            self.bearer.clone(),
        ))
    }

    /// `step` over the participant's Phases stream, its reply as `expect` picks it out; `None`
    /// when the participant serves no Phases (make the unary call).
    async fn over_stream<T>(
        &self,
        endpoint: &str,
        txn: TxnId,
        step: Step,
        expect: impl FnOnce(Reply) -> Option<T>,
    ) -> Option<Result<T, tonic::Status>> {
        let name = match &step {
            Step::Prepare(_) => "Prepare",
            Step::Commit(_) => "Commit",
            Step::Rollback(_) => "Rollback",
            Step::CommitOnePhase(_) => "CommitOnePhase",
        };
        let reply = self
            .phases
            .call(endpoint, || self.client(endpoint), step, txn.traceparent())
            .await;
        Some(match reply {
            Err(CallError::Unsupported) => return None,
            Err(CallError::Failed(status)) => Err(status),
            Ok(Reply::Error(e)) => Err(crate::process::call_stream::status(e)),
            Ok(reply) => expect(reply).ok_or_else(|| {
                tonic::Status::internal(format!(
                    "{endpoint} answered {name} over Phases with the reply of another step"
                ))
            }),
        })
    }
}

impl Participants for GrpcParticipants {
    fn check_endpoint(&self, endpoint: &str) -> Result<(), String> {
        self.tls
            .check_peer(endpoint)
            .map_err(|e| format!("participant endpoint {e}"))
    }

    async fn prepare(&self, endpoint: &str, txn: TxnId, timeout: Duration) -> Vote {
        let call = async {
            let req = PrepareRequest {
                txn_id: txn.to_string(),
                coordinator_id: self.coordinator_id.clone(),
            };
            let step = Step::Prepare(req.clone());
            let expect = |r| match r {
                Reply::Prepare(vote) => Some(vote),
                _ => None,
            };
            if let Some(reply) = self.over_stream(endpoint, txn, step, expect).await {
                return reply;
            }
            let mut client = self.client(endpoint)?;
            let req = unary(req, txn, timeout);
            client.prepare(req).await.map(|r| r.into_inner())
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Vote::No {
                reason: format!("no vote from {endpoint} within {timeout:?}"),
            },
            Ok(Err(status)) => Vote::No {
                reason: format!("prepare at {endpoint} failed: {}", status.message()),
            },
            Ok(Ok(resp)) => resp.into(),
        }
    }

    async fn commit_one_phase(
        &self,
        endpoint: &str,
        txn: TxnId,
        forget: &[TxnId],
        timeout: Duration,
    ) -> Result<OnePhaseOutcome, PeerError> {
        let secret = |txn| {
            self.marker_key
                .secret(&self.coordinator_id, txn)
                .into_bytes()
        };
        let req = CommitOnePhaseRequest {
            txn_id: txn.to_string(),
            coordinator_id: self.coordinator_id.clone(),
            marker_secret: secret(txn),
            forget_secrets: forget.iter().map(|f| secret(*f)).collect(),
        };
        let call = async {
            let step = Step::CommitOnePhase(req.clone());
            let expect = |r| match r {
                Reply::CommitOnePhase(outcome) => Some(outcome),
                _ => None,
            };
            if let Some(reply) = self.over_stream(endpoint, txn, step, expect).await {
                return reply;
            }
            let mut client = self.client(endpoint)?;
            let req = unary(req, txn, timeout);
            client.commit_one_phase(req).await.map(|r| r.into_inner())
        };
        let resp = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| {
                PeerError::Unreachable(format!("no answer from {endpoint} within {timeout:?}"))
            })?
            .map_err(peer_error)?;
        OnePhaseOutcome::try_from(resp).map_err(|n| {
            PeerError::Refused(format!(
                "{endpoint} answered CommitOnePhase with outcome {n}, neither committed nor aborted"
            ))
        })
    }

    async fn recover(&self, endpoint: &str, timeout: Duration) -> Result<Vec<TxnId>, PeerError> {
        let mut client = self.client(endpoint).map_err(peer_error)?;
        let mut req = tonic::Request::new(crate::proto::RecoverRequest {
            coordinator_id: self.coordinator_id.clone(),
        });
        req.set_timeout(timeout);
        let resp = tokio::time::timeout(timeout, client.recover(req))
            .await
            .map_err(|_| {
                PeerError::Unreachable(format!("no answer from {endpoint} within {timeout:?}"))
            })?
            .map_err(peer_error)?;
        Ok(resp
            .into_inner()
            .txn_ids
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect())
    }

    async fn finish(
        &self,
        endpoint: &str,
        txn: TxnId,
        xid: u64,
        ending: &Ending,
        timeout: Duration,
    ) -> Result<(), PeerError> {
        let (abort_reason, abort_sqlstate) = match ending {
            Ending::Commit => Default::default(),
            Ending::RollBack { reason, sqlstate } => (reason.clone(), sqlstate.clone()),
        };
        let req = BranchRequest {
            txn_id: txn.to_string(),
            xid,
            coordinator_id: self.coordinator_id.clone(),
            abort_reason,
            abort_sqlstate,
        };
        let call = async {
            let step = match ending {
                Ending::Commit => Step::Commit(req.clone()),
                Ending::RollBack { .. } => Step::Rollback(req.clone()),
            };
            let expect = |r| match r {
                Reply::Finished(_) => Some(()),
                _ => None,
            };
            if let Some(reply) = self.over_stream(endpoint, txn, step, expect).await {
                return reply;
            }
            let mut client = self.client(endpoint)?;
            let req = unary(req, txn, timeout);
            if ending.is_commit() {
                client.commit(req).await.map(|_| ())
            } else {
                client.rollback(req).await.map(|_| ())
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(PeerError::Unreachable(format!(
                "no answer from {endpoint} within {timeout:?}"
            ))),
            Ok(r) => r.map_err(peer_error),
        }
    }

    async fn health(&self, endpoint: &str, timeout: Duration) -> Health {
        let channel = match self.channel(endpoint) {
            Ok(c) => c,
            Err(status) => return Health::Unreachable(status.message().to_string()),
        };
        let mut client = HealthClient::new(channel);
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: PARTICIPANT_SERVICE.into(),
        });
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.check(req)).await {
            Err(_) => Health::Unreachable(format!("no answer within {timeout:?}")),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                Health::NotServing("it serves no twopc.v1.Participant health status".into())
            }
            Ok(Err(status)) => {
                Health::Unreachable(format!("{:?}: {}", status.code(), status.message()))
            }
            Ok(Ok(resp)) => match resp.into_inner().status() {
                ServingStatus::Serving => Health::Serving,
                other => {
                    Health::NotServing(format!("its health service says {}", other.as_str_name()))
                }
            },
        }
    }

    async fn saga_step(
        &self,
        endpoint: &str,
        step: SagaStepRequest,
        timeout: Duration,
    ) -> Result<SagaStepResponse, PeerError> {
        let mut client = self.client(endpoint).map_err(peer_error)?;
        let mut req = tonic::Request::new(step);
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.run_saga_step(req)).await {
            Err(_) => Err(PeerError::Unreachable(format!(
                "no answer from {endpoint} within {timeout:?}"
            ))),
            Ok(r) => r.map(tonic::Response::into_inner).map_err(peer_error),
        }
    }

    async fn call_service(
        &self,
        call: ServiceCall,
        timeout: Duration,
    ) -> Result<Vec<u8>, tonic::Status> {
        // The user's service gets no peer token: it is not one of ours.
        let channel = self.channel(&call.endpoint)?;
        super::service_call::call(channel, call, timeout).await
    }

    async fn waits(
        &self,
        endpoint: &str,
        min_wait: Duration,
        timeout: Duration,
    ) -> Result<Vec<LockWait>, PeerError> {
        let mut client = self.client(endpoint).map_err(peer_error)?;
        let mut req = tonic::Request::new(WaitsRequest {
            min_wait_ms: u32::try_from(min_wait.as_millis()).unwrap_or(u32::MAX),
        });
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.waits(req)).await {
            Err(_) => Err(PeerError::Unreachable(format!(
                "no answer from {endpoint} within {timeout:?}"
            ))),
            Ok(r) => r.map(|r| r.into_inner().waits).map_err(peer_error),
        }
    }
}

/// A participant refuses with FAILED_PRECONDITION when a branch did not end the way it was
/// asked to; anything else may pass with a retry.
fn peer_error(status: tonic::Status) -> PeerError {
    let message = status.message().to_string();
    if status.code() == tonic::Code::FailedPrecondition {
        PeerError::Refused(message)
    } else {
        PeerError::Unreachable(message)
    }
}

/// A phase call as a unary request: its deadline, and the transaction's trace context (see
/// `TxnId::traceparent`; over Phases it travels in the message).
fn unary<T>(req: T, txn: TxnId, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(req);
    req.set_timeout(timeout);
    if let Ok(v) = txn.traceparent().parse() {
        req.metadata_mut().insert("traceparent", v);
    }
    req
}
