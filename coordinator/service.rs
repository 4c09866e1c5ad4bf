//! The `twopc.v1.Coordinator` gRPC service: parses requests, calls the core, maps errors.

use super::log::Log;
use super::participants::Participants;
use super::transactions::Coordinator;
use super::wire;
use crate::process::auth::Caller;
use crate::process::call_stream;
use crate::proto::{self, TxnId, coordinator_server};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// The gRPC face of a [`Coordinator`].
pub struct Service<L: Log, P: Participants> {
    core: Arc<Coordinator<L, P>>,
    /// Turns true once a shutdown has drained the transactions in flight: every Enlist stream
    /// ends then (a graceful shutdown waits for them, and participants keep them open).
    /// `None`: streams end only when their participant ends them.
    closing: Option<watch::Receiver<bool>>,
    /// Whether this replica's lease still holds (docs/HA.md): the standby gate checks it at
    /// every call, and an enlistment on a stream opened earlier is checked here. `None`: not
    /// replicated.
    leads: Option<Leads>,
}

impl<L: Log, P: Participants> Service<L, P> {
    pub fn new(core: Arc<Coordinator<L, P>>) -> Self {
        Service {
            core,
            closing: None,
            leads: None,
        }
    }

    /// Ends every Enlist stream when `closing` turns true.
    pub fn with_closing(mut self, closing: watch::Receiver<bool>) -> Self {
        self.closing = Some(closing);
        self
    }

    /// Refuses enlistments on open streams once `leads` says this replica's lease has run out.
    pub fn with_lease(mut self, leads: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.leads = Some(Arc::new(leads));
        self
    }
}

/// Whether a replica still leads, by its own count.
type Leads = Arc<dyn Fn() -> bool + Send + Sync>;

/// RegisterBranch, as the unary RPC and each message on Enlist run it.
async fn register<L: Log, P: Participants>(
    core: &Arc<Coordinator<L, P>>,
    req: proto::RegisterBranchRequest,
) -> Result<proto::RegisterBranchResponse, Status> {
    let id = req.txn_id.parse::<TxnId>()?;
    let start = proto::Start::from_fields(req.epoch, req.timeout_ms, &req.label);
    let deadline = core
        .register(
            id,
            start.as_ref(),
            &req.participant_id,
            &req.endpoint,
            &req.instance_id,
            req.one_phase,
        )
        .await?;
    Ok(proto::RegisterBranchResponse {
        coordinator_id: core.id().to_string(),
        deadline_unix_ms: deadline,
    })
}

/// One enlistment that came over Enlist, its status carried in the reply.
async fn enlist<L: Log, P: Participants>(
    core: &Arc<Coordinator<L, P>>,
    leads: Option<&Leads>,
    req: proto::EnlistRequest,
) -> proto::EnlistReply {
    use proto::enlist_reply::Result as Reply;
    let result = match req.branch {
        _ if leads.is_some_and(|leads| !leads()) => Err(Status::unavailable(
            "this coordinator replica's lease has run out; enlist with the next leader",
        )),
        None => Err(Status::invalid_argument(
            "an EnlistRequest needs its branch (a RegisterBranchRequest)",
        )),
        Some(branch) => {
            let span = tracing::info_span!("register_branch", txn_id = %branch.txn_id, trace = %req.traceparent);
            register(core, branch).instrument(span).await
        }
    };
    proto::EnlistReply {
        call: req.call,
        result: Some(match result {
            Ok(enlisted) => Reply::Enlisted(enlisted),
            Err(status) => Reply::Error(call_stream::error(&status)),
        }),
    }
}

impl<L: Log, P: Participants> Service<L, P> {
    /// A Commit's or Abort's answer, with the current epoch in its metadata: a client whose
    /// transaction failed somewhere it could not see (a service it called was refused with
    /// `stale epoch`) starts the next one in the right epoch without asking.
    fn with_epoch<T>(&self, message: T) -> Response<T> {
        let mut resp = Response::new(message);
        let epoch = self.core.epoch().to_string().parse().expect("digits");
        resp.metadata_mut().insert(proto::EPOCH_METADATA, epoch);
        resp
    }
}

/// Who called, when the server checks tokens (`process::auth`).
fn caller<T>(req: &Request<T>) -> Option<Caller> {
    req.extensions().get::<Caller>().cloned()
}

/// The client's own deadline (the `grpc-timeout` header), if it sent a valid one: at most 8
/// digits and a unit, as gRPC defines it. Anything else is ignored, as if none was sent.
fn client_deadline<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    if n.len() > 8 {
        return None;
    }
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[tonic::async_trait]
impl<L: Log, P: Participants> coordinator_server::Coordinator for Service<L, P> {
    async fn begin(
        &self,
        req: Request<proto::BeginRequest>,
    ) -> Result<Response<proto::BeginResponse>, Status> {
        let begun_by = caller(&req).map(|c| c.name).unwrap_or_default();
        let req = req.into_inner();
        let (id, deadline) = self.core.begin_as(req.timeout_ms, req.label, begun_by)?;
        Ok(Response::new(proto::BeginResponse {
            txn_id: id.to_string(),
            deadline_unix_ms: deadline,
            epoch: self.core.epoch(),
        }))
    }

    #[tracing::instrument(name = "commit", skip_all, fields(txn_id = %req.get_ref().txn_id))]
    async fn commit(
        &self,
        req: Request<proto::CommitRequest>,
    ) -> Result<Response<proto::CommitResponse>, Status> {
        // Answer before the client gives up: phase 2 may be cut short, the outcome may not.
        let mut wait = match req.get_ref().wait() {
            proto::CommitWait::Decided => Duration::ZERO,
            proto::CommitWait::Applied | proto::CommitWait::Unspecified => {
                self.core.limits.commit_wait
            }
        };
        if let Some(d) = client_deadline(&req) {
            wait = wait.min(d.saturating_sub(Duration::from_millis(200)));
        }
        let id = req.get_ref().txn_id.parse::<TxnId>()?;
        let named = req
            .get_ref()
            .participants
            .as_ref()
            .map(|p| p.names.as_slice());
        let r = self.core.commit_named(id, named, wait).await?;
        Ok(self.with_epoch(proto::CommitResponse {
            outcome: proto::Outcome::from(r.outcome) as i32,
            reason: r.reason,
            branches_pending: r.branches_pending,
        }))
    }

    #[tracing::instrument(name = "abort", skip_all, fields(txn_id = %req.get_ref().txn_id))]
    async fn abort(
        &self,
        req: Request<proto::AbortRequest>,
    ) -> Result<Response<proto::AbortResponse>, Status> {
        let req = req.into_inner();
        let outcome = self
            .core
            .abort_in(
                req.txn_id.parse::<TxnId>()?,
                (req.epoch != 0).then_some(req.epoch),
                &req.reason,
            )
            .await?;
        Ok(self.with_epoch(proto::AbortResponse {
            outcome: proto::Outcome::from(outcome) as i32,
        }))
    }

    async fn submit_saga(
        &self,
        req: Request<proto::SubmitSagaRequest>,
    ) -> Result<Response<proto::Saga>, Status> {
        let saga = self.core.submit_saga(req.get_ref()).await?;
        Ok(Response::new(wire::saga(&saga)))
    }

    async fn get_saga(
        &self,
        req: Request<proto::GetSagaRequest>,
    ) -> Result<Response<proto::Saga>, Status> {
        let req = req.into_inner();
        let wait = Duration::from_millis(req.wait_ms.into());
        let saga = self.core.get_saga(&req.saga_id, wait).await?;
        Ok(Response::new(wire::saga(&saga)))
    }

    async fn list_sagas(
        &self,
        req: Request<proto::ListSagasRequest>,
    ) -> Result<Response<proto::ListSagasResponse>, Status> {
        let req = req.into_inner();
        let states = req
            .states
            .iter()
            .map(|&s| wire::saga_state_from_proto(s))
            .collect::<Result<Vec<_>, _>>()?;
        let limit = match req.limit {
            0 => 100,
            n => n.min(10_000) as usize,
        };
        let sagas = self.core.list_sagas(&states, limit)?;
        Ok(Response::new(proto::ListSagasResponse {
            sagas: sagas.iter().map(wire::saga).collect(),
        }))
    }

    async fn resolve_saga(
        &self,
        request: Request<proto::ResolveSagaRequest>,
    ) -> Result<Response<proto::Saga>, Status> {
        use super::saga::Intervention;
        let what = match request.get_ref().resolution() {
            proto::SagaResolution::Retry => Intervention::Retry,
            proto::SagaResolution::Skip => Intervention::Skip,
            proto::SagaResolution::Compensate => Intervention::Compensate,
            proto::SagaResolution::Unspecified => {
                return Err(Status::invalid_argument(
                    "resolution is required: SAGA_RESOLUTION_RETRY, SAGA_RESOLUTION_SKIP or SAGA_RESOLUTION_COMPENSATE",
                ));
            }
        };
        let operator = match caller(&request) {
            Some(c) => c.name,
            None if request.get_ref().operator.trim().is_empty() => {
                return Err(Status::invalid_argument(
                    "operator is required: who is deciding this saga by hand?",
                ));
            }
            None => request.get_ref().operator.clone(),
        };
        let req = request.into_inner();
        super::transactions::bounded("reason", &req.reason, super::transactions::MAX_TEXT)?;
        let saga = self
            .core
            .resolve_saga(&req.saga_id, what, &operator, &req.reason)
            .await?;
        Ok(Response::new(wire::saga(&saga)))
    }

    async fn get_transaction(
        &self,
        req: Request<proto::GetTransactionRequest>,
    ) -> Result<Response<proto::Transaction>, Status> {
        let id = req.get_ref().txn_id.parse::<TxnId>()?;
        Ok(Response::new(wire::transaction(&self.core.get(id)?)))
    }

    async fn list_transactions(
        &self,
        req: Request<proto::ListTransactionsRequest>,
    ) -> Result<Response<proto::ListTransactionsResponse>, Status> {
        let req = req.into_inner();
        let states = req
            .states
            .iter()
            .map(|&s| wire::state_from_proto(s))
            .collect::<Result<Vec<_>, _>>()?;
        let limit = match req.limit {
            0 => 100,
            n => n.min(10_000) as usize,
        };
        let transactions = self.core.list(&states, limit)?;
        Ok(Response::new(proto::ListTransactionsResponse {
            transactions: transactions.iter().map(wire::transaction).collect(),
        }))
    }

    #[tracing::instrument(name = "register_branch", skip_all, fields(txn_id = %req.get_ref().txn_id))]
    async fn register_branch(
        &self,
        req: Request<proto::RegisterBranchRequest>,
    ) -> Result<Response<proto::RegisterBranchResponse>, Status> {
        register(&self.core, req.into_inner())
            .await
            .map(Response::new)
    }

    type EnlistStream = call_stream::Replies<proto::EnlistReply>;

    async fn enlist(
        &self,
        req: Request<tonic::Streaming<proto::EnlistRequest>>,
    ) -> Result<Response<Self::EnlistStream>, Status> {
        let (core, leads) = (Arc::clone(&self.core), self.leads.clone());
        let closing = self.closing.clone();
        let closing = async move {
            match closing {
                Some(closing) => call_stream::closed(closing).await,
                None => std::future::pending().await,
            }
        };
        Ok(Response::new(call_stream::serve(
            req.into_inner(),
            closing,
            move |request| {
                let (core, leads) = (Arc::clone(&core), leads.clone());
                async move { enlist(&core, leads.as_ref(), request).await }
            },
        )))
    }

    async fn get_epoch(
        &self,
        _req: Request<proto::GetEpochRequest>,
    ) -> Result<Response<proto::GetEpochResponse>, Status> {
        let limits = self.core.limits();
        Ok(Response::new(proto::GetEpochResponse {
            epoch: self.core.epoch(),
            coordinator_id: self.core.id().to_string(),
            default_timeout_ms: limits.default_timeout.as_millis() as u32,
            max_timeout_ms: limits.max_timeout.as_millis() as u32,
        }))
    }

    #[tracing::instrument(name = "query_outcome", skip_all, fields(txn_id = %req.get_ref().txn_id))]
    async fn query_outcome(
        &self,
        req: Request<proto::QueryOutcomeRequest>,
    ) -> Result<Response<proto::QueryOutcomeResponse>, Status> {
        let id = req.get_ref().txn_id.parse::<TxnId>()?;
        let outcome = self.core.query_outcome(id, &req.get_ref().coordinator_id)?;
        Ok(Response::new(proto::QueryOutcomeResponse {
            outcome: proto::Outcome::from(outcome) as i32,
        }))
    }

    #[tracing::instrument(name = "resolve_transaction", skip_all, fields(txn_id = %request.get_ref().txn_id))]
    async fn resolve_transaction(
        &self,
        request: Request<proto::ResolveTransactionRequest>,
    ) -> Result<Response<proto::Transaction>, Status> {
        let req = request.get_ref();
        let id = req.txn_id.parse::<TxnId>()?;
        let commit = match req.resolution() {
            proto::Resolution::ForceCommit => true,
            proto::Resolution::ForceAbort => false,
            proto::Resolution::Unspecified => {
                return Err(Status::invalid_argument(
                    "resolution is required: RESOLUTION_FORCE_COMMIT or RESOLUTION_FORCE_ABORT",
                ));
            }
        };
        // With tokens, the audit line names the token; without, the operator names themself.
        let operator = match caller(&request) {
            Some(c) => c.name,
            None if request.get_ref().operator.trim().is_empty() => {
                return Err(Status::invalid_argument(
                    "operator is required: who is resolving this by hand?",
                ));
            }
            None => request.get_ref().operator.clone(),
        };
        let req = request.into_inner();
        self.core
            .resolve(id, commit, &operator, &req.reason)
            .await?;
        Ok(Response::new(wire::transaction(&self.core.get(id)?)))
    }

    async fn list_lock_waits(
        &self,
        request: Request<proto::ListLockWaitsRequest>,
    ) -> Result<Response<proto::ListLockWaitsResponse>, Status> {
        let min_wait = Duration::from_millis(request.get_ref().min_wait_ms.into());
        let found = self.core.lock_waits(min_wait).await;
        Ok(Response::new(proto::ListLockWaitsResponse {
            waits: found.waits,
            unreachable: found.unreachable,
        }))
    }

    async fn list_participants(
        &self,
        _request: Request<proto::ListParticipantsRequest>,
    ) -> Result<Response<proto::ListParticipantsResponse>, Status> {
        Ok(Response::new(proto::ListParticipantsResponse {
            participants: self.core.list_participants(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(v: &str) -> Request<()> {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("grpc-timeout", v.parse().unwrap());
        req
    }

    #[test]
    fn a_grpc_timeout_beyond_the_spec_is_ignored_not_a_panic() {
        assert_eq!(
            client_deadline(&with_timeout("1500m")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            client_deadline(&with_timeout("99999999H")),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(client_deadline(&with_timeout("99999999999999999H")), None);
        assert_eq!(client_deadline(&with_timeout("H")), None);
        assert_eq!(client_deadline(&with_timeout("12x")), None);
    }
}
