//! Reaching participants: what the coordinator asks of them in phase 1, phase 2 and the orphan
//! scan.
//!
//! The drivers (`commit.rs`, `recovery.rs`) are generic over [`Participants`], as they are over
//! the `Log`: [`GrpcParticipants`] in the binary, and in tests an in-memory fake that keeps
//! each participant's prepared branches the way its PostgreSQL would, so the commit driver and
//! recovery run crash by crash with no network and no database.

#[cfg(any(test, feature = "testkit"))]
pub mod fake;
mod grpc;
mod phase_stream;
pub mod service_call;

pub use grpc::GrpcParticipants;

use super::registry::Health;
use crate::proto::vote::{OnePhaseOutcome, Vote};
use crate::proto::{LockWait, SagaStepRequest, SagaStepResponse, TxnId};
use std::future::Future;
use std::time::Duration;

/// The participants, as the coordinator's drivers see them: addressed by endpoint, each call
/// bounded by `timeout`.
pub trait Participants: Send + Sync + 'static {
    /// Whether a participant at `endpoint` can be reached the way this coordinator dials
    /// (TLS or not); why not, for a person.
    fn check_endpoint(&self, _endpoint: &str) -> Result<(), String> {
        Ok(())
    }

    /// Phase 1 for one branch. Anything but a clear yes or read-only comes back as a no
    /// (a refusal, an error, no answer within `timeout`): a branch that did not say yes
    /// cannot commit.
    fn prepare(
        &self,
        endpoint: &str,
        txn: TxnId,
        timeout: Duration,
    ) -> impl Future<Output = Vote> + Send;

    /// Phase 2 for one branch: COMMIT PREPARED or a rollback. `xid` (0 if unknown) lets the
    /// participant tell how a branch whose gid is gone really ended.
    fn finish(
        &self,
        endpoint: &str,
        txn: TxnId,
        xid: u64,
        ending: &Ending,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), PeerError>> + Send;

    /// The waits for locks, at least `min_wait` old, of the branches at `endpoint`
    /// (`Participant.Waits`), for the deadlock detector.
    fn waits(
        &self,
        endpoint: &str,
        min_wait: Duration,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<LockWait>, PeerError>> + Send;

    /// One-phase commit of a lone branch: the participant's COMMIT decides. `forget`: earlier
    /// one-phase transactions whose end is durable here, whose markers it may delete. An
    /// error means no answer came (or the participant cannot tell yet): ask again.
    fn commit_one_phase(
        &self,
        endpoint: &str,
        txn: TxnId,
        forget: &[TxnId],
        timeout: Duration,
    ) -> impl Future<Output = Result<OnePhaseOutcome, PeerError>> + Send;

    /// The participant's health (`grpc.health.v1` Check of `twopc.v1.Participant`).
    fn health(&self, endpoint: &str, timeout: Duration) -> impl Future<Output = Health> + Send;

    /// One saga step (`Participant.RunSagaStep`, docs/SAGAS.md §4). An error means no answer
    /// that counts came: the step may or may not have applied, and the barrier makes sending
    /// it again safe.
    fn saga_step(
        &self,
        endpoint: &str,
        step: SagaStepRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<SagaStepResponse, PeerError>> + Send;

    /// A saga's gRPC step: `call.method` of the user's service at `call.endpoint`, with the
    /// request's bytes; the response's bytes, or the service's status (no answer within
    /// `timeout` is DEADLINE_EXCEEDED).
    fn call_service(
        &self,
        call: ServiceCall,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<u8>, tonic::Status>> + Send;

    /// The txn ids of this coordinator's branches prepared at `endpoint`.
    fn recover(
        &self,
        endpoint: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<TxnId>, PeerError>> + Send;
}

/// A saga step's call of a method of the user's own service (a gRPC step, docs/SAGAS.md §2).
#[derive(Clone, Debug)]
pub struct ServiceCall {
    pub endpoint: String,
    /// `/package.Service/Method`.
    pub method: String,
    /// The request message's bytes.
    pub request: Vec<u8>,
    pub saga_id: String,
    pub step: String,
    /// Its compensation, not its action.
    pub compensate: bool,
    /// The barrier secrets the service's own barrier keys the step by (`client::barrier`).
    pub action_secret: Vec<u8>,
    pub compensation_secret: Option<Vec<u8>>,
}

/// What phase 2 asks of a branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Commit,
    /// A rollback, with the abort's reason and its SQLSTATE (empty if it has none): a statement
    /// of the branch still running is cancelled, and its Execute fails with these.
    RollBack {
        reason: String,
        sqlstate: String,
    },
}

impl Ending {
    pub fn is_commit(&self) -> bool {
        matches!(self, Ending::Commit)
    }
}

/// Why a phase-2 or recovery call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The participant answered and refused: the branch did not end the way it was asked to.
    /// Retrying changes nothing, but an operator must hear of it.
    #[error("{0}")]
    Refused(String),
    /// No answer, or an error a retry may cure (the participant or its PostgreSQL is down).
    #[error("{0}")]
    Unreachable(String),
}
