//! The `twopc.v1.Participant` gRPC service: parses requests, calls the branch table, maps
//! errors. Every protocol step runs in its own task, so a client that cancels (or a deadline
//! that passes) cannot stop a PREPARE or a COMMIT PREPARED halfway through its bookkeeping.
//!
//! The coordinator's phase calls come either one RPC each (Prepare, Commit, Rollback,
//! CommitOnePhase) or many over one Phases stream; both run the same step functions below, so
//! the rules, the failpoints and the metrics cannot differ between the two.

use super::barrier::{Op, StepAnswer};
use super::branches::{AbortCause, Participant};
use super::database::Database;
use super::error::Error;
use super::link::CoordinatorLink;
use super::wire;
use crate::process::auth::{Caller, Role};
use crate::process::call_stream;
use crate::proto::marker::MarkerSecret;
use crate::proto::{self, TxnId, participant_server};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// The gRPC face of a [`Participant`].
pub struct Service<D: Database, C: CoordinatorLink> {
    core: Arc<Participant<D, C>>,
    /// Turns true when the server begins to shut down, which ends every Phases stream; `None`:
    /// Phases is not served (UNIMPLEMENTED, and the coordinator calls one RPC at a time), for
    /// a server whose shutdown this service cannot see.
    closing: Option<watch::Receiver<bool>>,
}

impl<D: Database, C: CoordinatorLink> Service<D, C> {
    pub fn new(core: Arc<Participant<D, C>>) -> Self {
        Service {
            core,
            closing: None,
        }
    }

    /// Serves Phases too; `closing` turns true when the server begins to shut down.
    pub fn with_phases(mut self, closing: watch::Receiver<bool>) -> Self {
        self.closing = Some(closing);
        self
    }
}

/// An abort's cause as the coordinator sent it, cut to a length fit for an error message: it
/// is only ever shown, so a long one is shortened rather than refused.
fn bounded(text: &str) -> String {
    const MAX: usize = 1024;
    match text.char_indices().nth(MAX) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

/// An operator deciding a branch by hand (twopcctl resolve --participant) leaves a trace.
/// Returns the line to log once the request has succeeded, if an operator sent it: with tokens,
/// a call with an operator token, named by the token; without, one with `x-twopc-operator`.
fn audit(
    req: &Request<proto::BranchRequest>,
    action: &'static str,
) -> Option<impl FnOnce() + use<>> {
    let header = |name| {
        req.metadata()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let operator = match req.extensions().get::<Caller>() {
        Some(Caller {
            name,
            role: Role::Operator,
        }) => name.clone(),
        // The coordinator's phase 2.
        Some(_) => return None,
        None => header("x-twopc-operator")?,
    };
    let reason = header("x-twopc-reason").unwrap_or_default();
    let (txn_id, coordinator_id) = (
        req.get_ref().txn_id.clone(),
        req.get_ref().coordinator_id.clone(),
    );
    Some(move || {
        tracing::warn!(
            audit = true,
            operator,
            reason,
            txn_id,
            coordinator_id,
            "operator forced {action} of a prepared branch (heuristic decision)"
        )
    })
}

/// The span a request's work logs in: the transaction, this participant, and the caller's
/// trace context (`traceparent`, whose trace id is the txn id when the coordinator calls).
fn span<T>(req: &Request<T>, rpc: &'static str, txn_id: &str, participant: &str) -> tracing::Span {
    let trace = req
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("branch", rpc, txn_id, participant, trace)
}

/// Runs a step to completion whatever happens to the RPC that asked for it.
async fn detached<T: Send + 'static>(
    span: tracing::Span,
    step: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Status> {
    match tokio::spawn(step.instrument(span)).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!(
            "the step failed unexpectedly: {e}"
        ))),
    }
}

/// Phase 1 for one branch, as Prepare and Phases run it.
async fn prepare<D: Database, C: CoordinatorLink>(
    core: Arc<Participant<D, C>>,
    req: proto::PrepareRequest,
    span: tracing::Span,
) -> Result<proto::PrepareResponse, Status> {
    let txn = req.txn_id.parse::<TxnId>()?;
    let vote = detached(
        span,
        async move { core.prepare(txn, &req.coordinator_id).await },
    )
    .await?;
    crate::failpoint!("participant::before_vote_reply");
    let resp = proto::PrepareResponse::from(vote);
    tracing::debug!(txn_id = %txn, vote = ?resp.vote(), "voted");
    metrics::counter!("twopc_participant_votes_total", "vote" => resp.vote().as_str_name())
        .increment(1);
    Ok(resp)
}

/// COMMIT PREPARED, as Commit and Phases run it.
async fn commit<D: Database, C: CoordinatorLink>(
    core: Arc<Participant<D, C>>,
    req: proto::BranchRequest,
    span: tracing::Span,
) -> Result<proto::BranchResponse, Status> {
    let txn = req.txn_id.parse::<TxnId>()?;
    detached(span, async move {
        core.commit(txn, req.xid, &req.coordinator_id).await
    })
    .await?;
    Ok(proto::BranchResponse {})
}

/// A rollback, prepared or not, as Rollback and Phases run it.
async fn rollback<D: Database, C: CoordinatorLink>(
    core: Arc<Participant<D, C>>,
    req: proto::BranchRequest,
    span: tracing::Span,
) -> Result<proto::BranchResponse, Status> {
    let txn = req.txn_id.parse::<TxnId>()?;
    let cause =
        (!req.abort_reason.is_empty() || !req.abort_sqlstate.is_empty()).then(|| AbortCause {
            reason: bounded(&req.abort_reason),
            sqlstate: bounded(&req.abort_sqlstate),
        });
    detached(span, async move {
        core.rollback_because(txn, req.xid, &req.coordinator_id, cause)
            .await
    })
    .await?;
    Ok(proto::BranchResponse {})
}

/// One-phase commit of a lone branch, as CommitOnePhase and Phases run it.
async fn commit_one_phase<D: Database, C: CoordinatorLink>(
    core: Arc<Participant<D, C>>,
    req: proto::CommitOnePhaseRequest,
    span: tracing::Span,
) -> Result<proto::CommitOnePhaseResponse, Status> {
    let txn = req.txn_id.parse::<TxnId>()?;
    let secret = MarkerSecret::new(req.marker_secret)?;
    let forget = req
        .forget_secrets
        .into_iter()
        .map(MarkerSecret::new)
        .collect::<Result<Vec<_>, _>>()?;
    let outcome = detached(span, async move {
        core.commit_one_phase(txn, &req.coordinator_id, &secret, &forget)
            .await
    })
    .await?;
    crate::failpoint!("participant::before_one_phase_reply");
    let resp = proto::CommitOnePhaseResponse::from(outcome);
    metrics::counter!("twopc_participant_one_phase_total", "outcome" => resp.outcome().as_str_name())
        .increment(1);
    Ok(resp)
}

/// One call that came over Phases: the step of the unary RPC of the same name, its status
/// carried in the reply.
async fn phase<D: Database, C: CoordinatorLink>(
    core: Arc<Participant<D, C>>,
    req: proto::PhaseRequest,
) -> proto::phase_reply::Result {
    use proto::phase_reply::Result as Reply;
    use proto::phase_request::Step;
    let id = core.id.clone();
    let span = |rpc, txn_id: &str| tracing::info_span!("branch", rpc, txn_id, participant = %id, trace = %req.traceparent);
    let result = match req.step {
        Some(Step::Prepare(r)) => {
            let span = span("Prepare", &r.txn_id);
            prepare(core, r, span).await.map(Reply::Prepare)
        }
        Some(Step::Commit(r)) => {
            let span = span("Commit", &r.txn_id);
            commit(core, r, span).await.map(Reply::Finished)
        }
        Some(Step::Rollback(r)) => {
            let span = span("Rollback", &r.txn_id);
            rollback(core, r, span).await.map(Reply::Finished)
        }
        Some(Step::CommitOnePhase(r)) => {
            let span = span("CommitOnePhase", &r.txn_id);
            commit_one_phase(core, r, span)
                .await
                .map(Reply::CommitOnePhase)
        }
        None => Err(Status::invalid_argument(
            "a PhaseRequest needs one step: prepare, commit, rollback or commit_one_phase",
        )),
    };
    result.unwrap_or_else(|status| Reply::Error(call_stream::error(&status)))
}

#[tonic::async_trait]
impl<D: Database, C: CoordinatorLink> participant_server::Participant for Service<D, C> {
    async fn execute(
        &self,
        req: Request<proto::ExecuteRequest>,
    ) -> Result<Response<proto::ExecuteResponse>, Status> {
        let span = span(&req, "Execute", &req.get_ref().txn_id, &self.core.id);
        let mut req = req.into_inner();
        let me = self.core.id.clone();
        let txn = req.txn_id.parse::<TxnId>()?;
        let start = proto::Start::from_fields(req.epoch, req.timeout_ms, &req.label);
        let batch = !req.statements.is_empty();
        let statements = wire::statements(&mut req)?;
        let count = statements.len() as u64;
        let core = Arc::clone(&self.core);
        let resp = detached(span, async move {
            core.execute_batch(txn, start.as_ref(), &statements).await
        })
        .await;
        let result = if resp.is_ok() { "ok" } else { "error" };
        metrics::counter!("twopc_participant_statements_total", "result" => result)
            .increment(count);
        let results = resp.map_err(|mut status| {
            // So the client can name this participant at Commit, answer or not.
            if let Ok(v) = me.parse() {
                status
                    .metadata_mut()
                    .insert(proto::PARTICIPANT_ID_METADATA, v);
            }
            status
        })?;
        Ok(Response::new(wire::execute_response(me, batch, results)))
    }

    async fn prepare(
        &self,
        req: Request<proto::PrepareRequest>,
    ) -> Result<Response<proto::PrepareResponse>, Status> {
        let span = span(&req, "Prepare", &req.get_ref().txn_id, &self.core.id);
        prepare(Arc::clone(&self.core), req.into_inner(), span)
            .await
            .map(Response::new)
    }

    async fn commit(
        &self,
        req: Request<proto::BranchRequest>,
    ) -> Result<Response<proto::BranchResponse>, Status> {
        let audit = audit(&req, "commit");
        let span = span(&req, "Commit", &req.get_ref().txn_id, &self.core.id);
        commit(Arc::clone(&self.core), req.into_inner(), span).await?;
        if let Some(log) = audit {
            log();
        }
        Ok(Response::new(proto::BranchResponse {}))
    }

    async fn rollback(
        &self,
        req: Request<proto::BranchRequest>,
    ) -> Result<Response<proto::BranchResponse>, Status> {
        let audit = audit(&req, "rollback");
        let span = span(&req, "Rollback", &req.get_ref().txn_id, &self.core.id);
        rollback(Arc::clone(&self.core), req.into_inner(), span).await?;
        if let Some(log) = audit {
            log();
        }
        Ok(Response::new(proto::BranchResponse {}))
    }

    async fn commit_one_phase(
        &self,
        req: Request<proto::CommitOnePhaseRequest>,
    ) -> Result<Response<proto::CommitOnePhaseResponse>, Status> {
        let span = span(&req, "CommitOnePhase", &req.get_ref().txn_id, &self.core.id);
        commit_one_phase(Arc::clone(&self.core), req.into_inner(), span)
            .await
            .map(Response::new)
    }

    type PhasesStream = call_stream::Replies<proto::PhaseReply>;

    async fn phases(
        &self,
        req: Request<tonic::Streaming<proto::PhaseRequest>>,
    ) -> Result<Response<Self::PhasesStream>, Status> {
        let Some(closing) = self.closing.clone() else {
            return Err(Status::unimplemented(
                "this participant takes the coordinator's calls one RPC at a time (Prepare, \
                 Commit, Rollback, CommitOnePhase), not over Phases",
            ));
        };
        let core = Arc::clone(&self.core);
        Ok(Response::new(call_stream::serve(
            req.into_inner(),
            call_stream::closed(closing),
            move |request: proto::PhaseRequest| {
                let core = Arc::clone(&core);
                async move {
                    let call = request.call;
                    let result = phase(core, request).await;
                    proto::PhaseReply {
                        call,
                        result: Some(result),
                    }
                }
            },
        )))
    }

    async fn waits(
        &self,
        req: Request<proto::WaitsRequest>,
    ) -> Result<Response<proto::WaitsResponse>, Status> {
        let min_wait = std::time::Duration::from_millis(req.get_ref().min_wait_ms.into());
        let waits = self.core.waits(min_wait).await?;
        let waits = waits
            .into_iter()
            .map(|w| wire::lock_wait(&self.core.id, w))
            .collect();
        Ok(Response::new(proto::WaitsResponse { waits }))
    }

    async fn run_saga_step(
        &self,
        req: Request<proto::SagaStepRequest>,
    ) -> Result<Response<proto::SagaStepResponse>, Status> {
        let span = tracing::info_span!("saga_step", saga_id = %req.get_ref().saga_id,
            step = %req.get_ref().step, participant = %self.core.id);
        let call = wire::saga_step(req.into_inner())?;
        let core = Arc::clone(&self.core);
        let (call, answer) = detached(span, async move {
            let answer = core.saga_step(&call).await?;
            Ok((call, answer))
        })
        .await?;
        if matches!(answer, StepAnswer::Applied(_) | StepAnswer::Null) {
            match call.op {
                Op::Action => {
                    crate::failpoint!("participant::saga_step_committed");
                }
                Op::Compensate => {
                    crate::failpoint!("participant::saga_compensation_committed");
                }
                Op::Forget => {}
            }
        }
        let resp = wire::saga_step_response(answer);
        metrics::counter!("twopc_participant_saga_steps_total", "outcome" => resp.outcome().as_str_name())
            .increment(1);
        Ok(Response::new(resp))
    }

    async fn recover(
        &self,
        req: Request<proto::RecoverRequest>,
    ) -> Result<Response<proto::RecoverResponse>, Status> {
        let branches = self.core.recover(&req.get_ref().coordinator_id).await?;
        let branches: Vec<proto::PreparedBranch> =
            branches.into_iter().map(wire::prepared_branch).collect();
        Ok(Response::new(proto::RecoverResponse {
            txn_ids: branches.iter().map(|b| b.txn_id.clone()).collect(),
            branches,
        }))
    }
}
