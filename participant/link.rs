//! The participant's line to its coordinator: enlisting a branch, and asking how an in-doubt
//! one ended.
//!
//! Behind [`CoordinatorLink`] so the branch table and the resolver run against an in-memory
//! coordinator in tests; [`GrpcCoordinator`] is the real one.

use crate::process::auth::Bearer;
use crate::process::call_stream::{self, Line, LineError};
use crate::process::leader_channel::LeaderChannel;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::{
    self, EnlistReply, EnlistRequest, Outcome, RegisterBranchRequest, RegisterBranchResponse,
    Start, TxnId, enlist_reply,
};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// The coordinator reached over gRPC: enlistments over one Enlist stream
/// ([`crate::process::call_stream`]), falling back to RegisterBranch calls with a coordinator
/// that serves no Enlist (an older version, or a token that is not a peer's).
#[derive(Clone)]
pub struct GrpcCoordinator {
    client: CoordinatorClient<InterceptedService<LeaderChannel, Bearer>>,
    channel: LeaderChannel,
    bearer: Bearer,
    enlist: Arc<Line<EnlistRequest, EnlistReply>>,
    /// The coordinator answered Enlist with UNIMPLEMENTED or PERMISSION_DENIED.
    unary_only: Arc<AtomicBool>,
}

impl GrpcCoordinator {
    /// `bearer`: this participant's peer token, on every call.
    pub fn new(channel: LeaderChannel, bearer: Bearer) -> Self {
        GrpcCoordinator {
            client: CoordinatorClient::with_interceptor(channel.clone(), bearer.clone()),
            channel,
            bearer,
            enlist: Arc::new(Line::new(
                "Enlist stream to the coordinator".into(),
                "twopc_participant_enlist_streams_opened_total",
            )),
            unary_only: Arc::new(AtomicBool::new(false)),
        }
    }

    /// How many Enlist streams have been opened.
    pub fn enlist_streams_opened(&self) -> u64 {
        self.enlist.opened()
    }

    /// `branch` over the Enlist stream; `None` when the coordinator serves none (make the
    /// unary call).
    async fn over_stream(
        &self,
        branch: RegisterBranchRequest,
        traceparent: String,
    ) -> Option<Result<RegisterBranchResponse, tonic::Status>> {
        if self.unary_only.load(Ordering::Relaxed) {
            return None;
        }
        let request = |call| EnlistRequest {
            call,
            traceparent: traceparent.clone(),
            branch: Some(branch.clone()),
        };
        let open = || {
            self.channel.open_stream(|ch| {
                let client = CoordinatorClient::with_interceptor(ch, self.bearer.clone());
                async move {
                    // Each attempt its own requests: one refused sent none that count.
                    let (requests, outgoing) = futures::channel::mpsc::unbounded();
                    let replies = client.clone().enlist(outgoing).await?.into_inner();
                    Ok((requests, replies))
                }
            })
        };
        let reply = match self.enlist.call(request, open).await {
            Ok(reply) => reply,
            Err(LineError::Open(status))
                if matches!(
                    status.code(),
                    tonic::Code::Unimplemented | tonic::Code::PermissionDenied
                ) =>
            {
                tracing::info!(
                    "the coordinator does not take enlistments over Enlist ({}); RegisterBranch calls",
                    status.message()
                );
                self.unary_only.store(true, Ordering::Relaxed);
                return None;
            }
            Err(LineError::Open(status) | LineError::Broke(status)) => return Some(Err(status)),
        };
        Some(match reply.result {
            Some(enlist_reply::Result::Enlisted(enlisted)) => Ok(enlisted),
            Some(enlist_reply::Result::Error(e)) => Err(call_stream::status(e)),
            None => Err(tonic::Status::unavailable(
                "the coordinator answered an enlistment with no result",
            )),
        })
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
        let branch = RegisterBranchRequest {
            txn_id: txn.to_string(),
            participant_id: participant_id.to_string(),
            endpoint: endpoint.to_string(),
            instance_id: instance.to_string(),
            one_phase,
            epoch: start.map_or(0, |s| s.epoch),
            timeout_ms: start.map_or(0, |s| s.timeout_ms),
            label: start.map(|s| s.label.clone()).unwrap_or_default(),
        };
        let traceparent = txn.traceparent();
        let resp = match self.over_stream(branch.clone(), traceparent.clone()).await {
            Some(resp) => resp?,
            None => {
                let mut req = tonic::Request::new(branch);
                if let Ok(v) = traceparent.parse() {
                    req.metadata_mut().insert("traceparent", v);
                }
                self.client.clone().register_branch(req).await?.into_inner()
            }
        };
        crate::failpoint!("participant::enlisted");
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

#[cfg(test)]
mod tests {
    use super::{CoordinatorLink, GrpcCoordinator};
    use crate::coordinator::log::MemLog;
    use crate::coordinator::participants::fake::FakeParticipants;
    use crate::coordinator::service::Service;
    use crate::coordinator::transactions::{Coordinator, Limits};
    use crate::process::leader_channel::LeaderChannel;
    use crate::process::tls::Tls;
    use crate::proto::coordinator_server::CoordinatorServer;
    use crate::proto::{Start, TxnId};
    use futures::future::join_all;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::net::TcpListener;
    use tokio::sync::{oneshot, watch};

    type Core = Arc<Coordinator<MemLog, FakeParticipants>>;

    /// A coordinator over an in-memory log, served on loopback as the binary serves it.
    struct Served {
        stop: oneshot::Sender<()>,
        server: tokio::task::JoinHandle<()>,
    }

    fn core() -> Core {
        Coordinator::with_participants(
            "c1".into(),
            MemLog::default(),
            FakeParticipants::default(),
            Limits::default(),
        )
        .unwrap()
    }

    async fn serve(core: &Core, addr: std::net::SocketAddr) -> (Served, String) {
        let listener = TcpListener::bind(addr).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let (closing, enlist_end) = watch::channel(false);
        let service = Service::new(Arc::clone(core)).with_closing(enlist_end);
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(CoordinatorServer::new(service))
                .serve_with_incoming_shutdown(
                    crate::process::server::incoming(listener),
                    async move {
                        let _ = stopped.await;
                        let _ = closing.send(true);
                    },
                )
                .await
                .unwrap();
        });
        (Served { stop, server }, url)
    }

    fn link(url: &str) -> GrpcCoordinator {
        GrpcCoordinator::new(
            LeaderChannel::new(url, &Tls::default()).unwrap(),
            Default::default(),
        )
    }

    async fn enlist(
        link: &GrpcCoordinator,
        txn: TxnId,
        start: Option<&Start>,
    ) -> tonic::Result<String> {
        link.register(txn, start, "p1", "http://127.0.0.1:1", "i1", false)
            .await
            .map(|e| e.coordinator_id)
    }

    #[tokio::test]
    async fn the_enlistments_of_many_transactions_share_one_stream() {
        let core = core();
        let (_served, url) = serve(&core, ([127, 0, 0, 1], 0).into()).await;
        let link = link(&url);
        let begun: Vec<TxnId> = (0..40)
            .map(|_| core.begin_as(0, String::new(), String::new()).unwrap().0)
            .collect();
        let start = Start {
            epoch: core.epoch(),
            timeout_ms: 0,
            label: "stream".into(),
        };
        let started: Vec<TxnId> = (0..40).map(|_| TxnId::generate()).collect();

        let enlisted = join_all(
            begun
                .iter()
                .map(|t| enlist(&link, *t, None))
                .chain(started.iter().map(|t| enlist(&link, *t, Some(&start)))),
        )
        .await;

        assert!(
            enlisted.iter().all(|e| e.as_deref().ok() == Some("c1")),
            "{enlisted:?}"
        );
        for txn in begun.iter().chain(&started) {
            assert_eq!(
                core.get(*txn).unwrap().txn.branches.len(),
                1,
                "{txn} has its branch"
            );
        }
        assert_eq!(link.enlist_streams_opened(), 1);
    }

    #[tokio::test]
    async fn a_refused_enlistment_comes_back_as_register_branch_would_have_failed() {
        let core = core();
        let (_served, url) = serve(&core, ([127, 0, 0, 1], 0).into()).await;
        let link = link(&url);
        // Another epoch than the coordinator's (an older one, as a restart leaves it; 0 means
        // none at all).
        let stale = Start {
            epoch: core.epoch() + 1,
            timeout_ms: 0,
            label: String::new(),
        };

        let unknown = enlist(&link, TxnId::generate(), None).await;
        let old_epoch = enlist(&link, TxnId::generate(), Some(&stale)).await;
        let begun = core.begin_as(0, String::new(), String::new()).unwrap().0;
        let after = enlist(&link, begun, None).await;

        let unknown = unknown.unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
        let old_epoch = old_epoch.unwrap_err();
        assert_eq!(
            old_epoch.code(),
            tonic::Code::FailedPrecondition,
            "{old_epoch:?}"
        );
        assert!(old_epoch.message().contains("stale epoch"), "{old_epoch:?}");
        let epoch = old_epoch.metadata().get(crate::proto::EPOCH_METADATA);
        assert_eq!(
            epoch.and_then(|e| e.to_str().ok()),
            Some(core.epoch().to_string().as_str()),
            "the epoch to start again in travels with the refusal"
        );
        assert_eq!(after.as_deref().ok(), Some("c1"), "{after:?}");
        assert_eq!(
            link.enlist_streams_opened(),
            1,
            "a refusal leaves the stream open"
        );
    }

    #[tokio::test]
    async fn a_coordinator_shutting_down_ends_the_stream_and_the_next_enlistment_opens_another() {
        let core = core();
        let (served, url) = serve(&core, ([127, 0, 0, 1], 0).into()).await;
        let link = link(&url);
        let first = core.begin_as(0, String::new(), String::new()).unwrap().0;
        enlist(&link, first, None).await.unwrap();

        // The participant keeps its stream open; a graceful shutdown must not wait on it.
        served.stop.send(()).unwrap();
        let stopped = tokio::time::timeout(Duration::from_secs(20), served.server).await;
        let addr = url.trim_start_matches("http://").parse().unwrap();
        let (_served, _) = serve(&core, addr).await;
        let second = core.begin_as(0, String::new(), String::new()).unwrap().0;
        let again = enlist(&link, second, None).await;

        assert!(stopped.is_ok(), "the shutdown waited on the open stream");
        assert_eq!(again.as_deref().ok(), Some("c1"), "{again:?}");
        assert_eq!(link.enlist_streams_opened(), 2);
    }
}
