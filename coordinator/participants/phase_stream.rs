//! The coordinator's phase calls to a participant, many over one long-lived `Phases` stream
//! (the mechanism, and why it pays, in [`crate::process::call_stream`]).
//!
//! Nothing of the protocol changes. A call's reply is what the unary RPC would have answered
//! (the participant runs the same step function for both), and a call whose stream breaks
//! fails as a unary call that got no answer, which the drivers already handle: a missing vote
//! is a no, a phase-2 call is retried. A participant that does not serve Phases (an embedded
//! one, an older version) answers UNIMPLEMENTED once, and from then on gets unary calls.

use super::grpc::Client;
use crate::process::call_stream::{Line, LineError};
use crate::proto::{PhaseReply, PhaseRequest, phase_reply, phase_request};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tonic::{Code, Status};

/// One stream per participant endpoint, opened on first use and again after it breaks.
#[derive(Default)]
pub struct PhaseStreams {
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
}

struct Endpoint {
    line: Line<PhaseRequest, PhaseReply>,
    /// The participant answered Phases with UNIMPLEMENTED (or PERMISSION_DENIED): it gets
    /// unary calls.
    unary_only: AtomicBool,
}

/// Why a call over the stream did not bring a reply.
#[derive(Debug)]
pub enum CallError {
    /// The participant does not serve Phases (to this coordinator): make the unary call.
    Unsupported,
    /// What a unary call would have failed with: the stream could not be opened, or it broke
    /// before the reply came.
    Failed(Status),
}

impl PhaseStreams {
    /// Sends `step` to the participant at `endpoint` and waits for its reply; `client` dials
    /// it if no stream is open. Cancel-safe.
    pub async fn call(
        &self,
        endpoint: &str,
        client: impl Fn() -> Result<Client, Status>,
        step: phase_request::Step,
        traceparent: String,
    ) -> Result<phase_reply::Result, CallError> {
        let state = self.endpoint(endpoint);
        if state.unary_only.load(Ordering::Relaxed) {
            return Err(CallError::Unsupported);
        }
        let request = |call| PhaseRequest {
            call,
            traceparent: traceparent.clone(),
            step: Some(step.clone()),
        };
        let open = || {
            let client = client();
            let state = &state;
            async move {
                let (requests, outgoing) = futures::channel::mpsc::unbounded();
                match client.map_err(CallError::Failed)?.phases(outgoing).await {
                    Ok(replies) => Ok((requests, replies.into_inner())),
                    // PERMISSION_DENIED: this coordinator's token is not a peer's (an
                    // operator's may make the unary calls, not open Phases).
                    Err(status)
                        if matches!(
                            status.code(),
                            Code::Unimplemented | Code::PermissionDenied
                        ) =>
                    {
                        tracing::info!(
                            endpoint,
                            "participant does not serve Phases to this coordinator ({}); unary calls",
                            status.message()
                        );
                        state.unary_only.store(true, Ordering::Relaxed);
                        Err(CallError::Unsupported)
                    }
                    Err(status) => Err(CallError::Failed(status)),
                }
            }
        };
        match state.line.call(request, open).await {
            // A malformed reply (no result) fails the call as a broken stream does.
            Ok(PhaseReply {
                result: Some(result),
                ..
            }) => Ok(result),
            Ok(PhaseReply { result: None, .. }) => Err(CallError::Failed(Status::unavailable(
                format!("{endpoint} answered a phase call over Phases with no result"),
            ))),
            Err(LineError::Open(e)) => Err(e),
            Err(LineError::Broke(status)) => Err(CallError::Failed(status)),
        }
    }

    /// How many streams have been opened (operators see `twopc_phase_streams_opened_total`).
    #[cfg(test)]
    pub fn opened(&self) -> u64 {
        let endpoints = self.endpoints.lock().unwrap();
        endpoints.values().map(|e| e.line.opened()).sum()
    }

    fn endpoint(&self, endpoint: &str) -> Arc<Endpoint> {
        let mut endpoints = self.endpoints.lock().unwrap();
        // Every phase call comes here: no key is allocated for an endpoint already known.
        if let Some(known) = endpoints.get(endpoint) {
            return Arc::clone(known);
        }
        let state = Endpoint {
            line: Line::new(
                format!("Phases stream to {endpoint}"),
                "twopc_phase_streams_opened_total",
            ),
            unary_only: AtomicBool::new(false),
        };
        Arc::clone(
            endpoints
                .entry(endpoint.to_string())
                .or_insert_with(|| Arc::new(state)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Ending, GrpcParticipants, Participants, PeerError};
    use crate::participant::fake::{FakeCoordinator, FakeDatabase};
    use crate::participant::service::Service;
    use crate::participant::{self, Participant};
    use crate::proto::TxnId;
    use crate::proto::participant_server::ParticipantServer;
    use crate::proto::vote::{OnePhaseOutcome, Vote};
    use futures::future::join_all;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    const COORDINATOR: &str = "c1";
    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A participant process over an in-memory database, on a runtime of its own so that it
    /// can die as a process does (its connections and tasks gone at once).
    struct Served {
        core: Arc<Participant<FakeDatabase, FakeCoordinator>>,
        endpoint: String,
        addr: std::net::SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        server: tokio::task::JoinHandle<()>,
        runtime: Option<tokio::runtime::Runtime>,
    }

    impl Served {
        fn die(self) {
            drop(self);
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            if let Some(runtime) = self.runtime.take() {
                runtime.shutdown_background();
            }
        }
    }

    /// Serves on `addr` (any free port if `None`); `phases`: as the participant binary does,
    /// or, if false, as an embedded participant is: on its host's server, without Phases.
    fn serve(db: &FakeDatabase, addr: Option<std::net::SocketAddr>, phases: bool) -> Served {
        let addr = addr.unwrap_or(([127, 0, 0, 1], 0).into());
        // The port of a participant that just died may take a moment to be free again.
        let listener = (0..100)
            .find_map(|_| {
                std::net::TcpListener::bind(addr)
                    .inspect_err(|_| std::thread::sleep(Duration::from_millis(20)))
                    .ok()
            })
            .expect("the port is free again");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoint = format!("http://{addr}");
        let deadline = crate::process::clock::now_ms() + 60_000;
        let core = Participant::new(
            "p1".into(),
            endpoint.clone(),
            db.clone(),
            FakeCoordinator::new(COORDINATOR, deadline),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let served = Arc::clone(&core);
        let server = runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            if phases {
                participant::serve(listener, served, shutdown)
                    .await
                    .unwrap();
            } else {
                tonic::transport::Server::builder()
                    .add_service(ParticipantServer::new(Service::new(served)))
                    .serve_with_incoming_shutdown(
                        crate::process::server::incoming(listener),
                        shutdown,
                    )
                    .await
                    .unwrap();
            }
        });
        Served {
            core,
            endpoint,
            addr,
            stop: Some(stop),
            server,
            runtime: Some(runtime),
        }
    }

    fn coordinator() -> GrpcParticipants {
        GrpcParticipants::new(
            COORDINATOR.into(),
            crate::coordinator::marker_key::MarkerKey::generate(),
            Duration::from_secs(2),
            Default::default(),
            Default::default(),
        )
    }

    /// Opens `n` branches, each with one write.
    async fn branches(p: &Served, n: usize) -> Vec<TxnId> {
        let txns: Vec<TxnId> = (0..n).map(|_| TxnId::generate()).collect();
        for txn in &txns {
            p.core
                .execute(*txn, "UPDATE acct SET bal = 1", &[])
                .await
                .unwrap();
        }
        txns
    }

    /// Phase 1 then phase 2 for every branch at once, as a busy coordinator runs them.
    async fn commit_all(c: &GrpcParticipants, endpoint: &str, txns: &[TxnId]) {
        let votes = join_all(txns.iter().map(|t| c.prepare(endpoint, *t, TIMEOUT))).await;
        let finished = join_all(txns.iter().zip(votes).map(|(t, vote)| {
            let Vote::Yes { xid } = vote else {
                panic!("a branch that wrote voted {vote:?}")
            };
            c.finish(endpoint, *t, xid, &Ending::Commit, TIMEOUT)
        }))
        .await;
        assert!(finished.iter().all(Result::is_ok), "{finished:?}");
    }

    #[tokio::test]
    async fn the_phase_calls_of_many_transactions_share_one_stream() {
        let db = FakeDatabase::default();
        let p = serve(&db, None, true);
        let c = coordinator();
        let txns = branches(&p, 40).await;

        commit_all(&c, &p.endpoint, &txns).await;
        let lone = branches(&p, 1).await[0];
        let one_phase = c.commit_one_phase(&p.endpoint, lone, &[], TIMEOUT).await;
        let rolled_back = branches(&p, 1).await[0];
        let ending = Ending::RollBack {
            reason: "the client aborted".into(),
            sqlstate: String::new(),
        };
        let rollback = c
            .finish(&p.endpoint, rolled_back, 0, &ending, TIMEOUT)
            .await;

        assert!(matches!(one_phase, Ok(OnePhaseOutcome::Committed { .. })));
        assert_eq!(rollback, Ok(()));
        assert!(db.prepared().is_empty());
        assert_eq!(db.open_transactions(), 0);
        assert_eq!(c.phases.opened(), 1, "every call went over one stream");
    }

    #[tokio::test]
    async fn a_participant_that_serves_no_phases_stream_gets_unary_calls() {
        let db = FakeDatabase::default();
        let p = serve(&db, None, false);
        let c = coordinator();
        let txns = branches(&p, 5).await;

        commit_all(&c, &p.endpoint, &txns).await;

        assert!(db.prepared().is_empty());
        assert_eq!(c.phases.opened(), 0);
    }

    #[tokio::test]
    async fn a_participant_shutting_down_ends_its_stream_and_the_next_call_opens_another() {
        let db = FakeDatabase::default();
        let mut p = serve(&db, None, true);
        let c = coordinator();
        commit_all(&c, &p.endpoint, &branches(&p, 3).await).await;

        // The coordinator keeps its stream open; a graceful shutdown must not wait on it.
        p.stop.take().unwrap().send(()).unwrap();
        let stopped = tokio::time::timeout(Duration::from_secs(20), &mut p.server).await;
        let down = branches(&p, 1).await[0];
        let vote = c.prepare(&p.endpoint, down, TIMEOUT).await;
        let addr = p.addr;
        p.die();
        let p = serve(&db, Some(addr), true);
        commit_all(&c, &p.endpoint, &branches(&p, 3).await).await;

        assert!(stopped.is_ok(), "the shutdown waited on the open stream");
        assert!(matches!(vote, Vote::No { .. }), "no participant: {vote:?}");
        assert_eq!(c.phases.opened(), 2);
        assert!(db.prepared().is_empty());
    }

    #[tokio::test]
    async fn a_call_to_a_participant_that_died_fails_as_unreachable_and_its_retry_reconnects() {
        let db = FakeDatabase::default();
        let p = serve(&db, None, true);
        let c = coordinator();
        let txn = branches(&p, 1).await[0];
        let Vote::Yes { xid } = c.prepare(&p.endpoint, txn, TIMEOUT).await else {
            panic!("a branch that wrote must vote yes")
        };

        // Dies as a process does: its connections close under the open stream.
        let (addr, endpoint) = (p.addr, p.endpoint.clone());
        p.die();
        let lost = c
            .finish(&endpoint, txn, xid, &Ending::Commit, TIMEOUT)
            .await;
        let p = serve(&db, Some(addr), true);
        let retried = c
            .finish(&p.endpoint, txn, xid, &Ending::Commit, TIMEOUT)
            .await;

        assert!(matches!(lost, Err(PeerError::Unreachable(_))), "{lost:?}");
        assert_eq!(retried, Ok(()), "phase 2 retried on a new stream");
        assert!(db.prepared().is_empty());
    }
}
