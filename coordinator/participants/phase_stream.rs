//! The coordinator's phase calls to a participant, many over one long-lived `Phases` stream.
//!
//! Why: on this project's 2-core machines a unary gRPC call costs about 85 µs of CPU over its
//! two ends (a new HTTP/2 stream, HPACK headers, a server task, the token check), and a
//! two-branch transaction made four of them to participants. A message on a stream that is
//! already open costs a fraction of that, and messages queued together leave in one frame.
//!
//! Nothing of the protocol changes. A call's reply is what the unary RPC would have answered
//! (the participant runs the same step function for both), and a call whose stream breaks
//! fails as a unary call that got no answer, which the drivers already handle: a missing vote
//! is a no, a phase-2 call is retried. A participant that does not serve Phases (an embedded
//! one, an older version) answers UNIMPLEMENTED once, and from then on gets unary calls.

use super::grpc::Client;
use crate::proto::{PhaseRequest, phase_reply, phase_request};
use futures::channel::mpsc;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tonic::{Code, Status};

/// One stream per participant endpoint, opened on first use and again after it breaks.
#[derive(Default)]
pub struct PhaseStreams {
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    /// Call numbers, unique across every stream of this coordinator.
    next_call: AtomicU64,
    /// Streams opened so far: one per participant unless they break.
    opened: AtomicU64,
}

#[derive(Default)]
struct Endpoint {
    /// The stream in use; behind an async lock so that one caller opens it while the others
    /// wait for it rather than each opening their own.
    stream: tokio::sync::Mutex<Option<Arc<Open>>>,
    /// The participant answered Phases with UNIMPLEMENTED (or PERMISSION_DENIED): it gets
    /// unary calls.
    unary_only: AtomicBool,
}

/// An open stream: where requests go, and who waits for which reply.
struct Open {
    requests: mpsc::UnboundedSender<PhaseRequest>,
    waiting: Arc<Mutex<Waiting>>,
}

#[derive(Default)]
struct Waiting {
    /// The replies stopped (the stream ended or broke): no call may wait on it any more.
    closed: bool,
    calls: HashMap<u64, oneshot::Sender<phase_reply::Result>>,
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
    /// it if no stream is open. Cancel-safe: a caller that gives up (its timeout) leaves no
    /// entry behind.
    pub async fn call(
        &self,
        endpoint: &str,
        client: impl Fn() -> Result<Client, Status>,
        step: phase_request::Step,
        traceparent: String,
    ) -> Result<phase_reply::Result, CallError> {
        let endpoint_state = self.endpoint(endpoint);
        if endpoint_state.unary_only.load(Ordering::Relaxed) {
            return Err(CallError::Unsupported);
        }
        let call = self.next_call.fetch_add(1, Ordering::Relaxed);
        // A stream found closed as the call is entered was broken by an earlier call's failure,
        // not this one's: open a fresh one once rather than failing a call nobody sent.
        for _ in 0..2 {
            let open = endpoint_state.open(endpoint, &client, &self.opened).await?;
            let (tx, rx) = oneshot::channel();
            {
                let mut waiting = open.waiting.lock().unwrap();
                if waiting.closed {
                    continue;
                }
                waiting.calls.insert(call, tx);
            }
            let _forget = Forget {
                waiting: &open.waiting,
                call,
            };
            let request = PhaseRequest {
                call,
                traceparent: traceparent.clone(),
                step: Some(step.clone()),
            };
            if open.requests.unbounded_send(request).is_err() {
                continue;
            }
            return rx.await.map_err(|_| {
                CallError::Failed(Status::unavailable(format!(
                    "the Phases stream to {endpoint} broke before the participant answered"
                )))
            });
        }
        Err(CallError::Failed(Status::unavailable(format!(
            "the Phases stream to {endpoint} keeps closing"
        ))))
    }

    /// How many streams have been opened (operators see `twopc_phase_streams_opened_total`).
    #[cfg(test)]
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    fn endpoint(&self, endpoint: &str) -> Arc<Endpoint> {
        let mut endpoints = self.endpoints.lock().unwrap();
        // Every phase call comes here: no key is allocated for an endpoint already known.
        if let Some(known) = endpoints.get(endpoint) {
            return Arc::clone(known);
        }
        Arc::clone(endpoints.entry(endpoint.to_string()).or_default())
    }
}

impl Endpoint {
    /// The open stream, or a new one.
    async fn open(
        &self,
        endpoint: &str,
        client: &impl Fn() -> Result<Client, Status>,
        opened: &AtomicU64,
    ) -> Result<Arc<Open>, CallError> {
        let mut stream = self.stream.lock().await;
        if let Some(open) = stream.as_ref()
            && !open.waiting.lock().unwrap().closed
        {
            return Ok(Arc::clone(open));
        }
        // Dropping the old stream's sender ends its requests, which lets the participant end
        // the stream.
        *stream = None;
        let (requests, outgoing) = mpsc::unbounded();
        let mut replies = match client().map_err(CallError::Failed)?.phases(outgoing).await {
            Ok(replies) => replies.into_inner(),
            // PERMISSION_DENIED: this coordinator's token is not a peer's (an operator's may
            // make the unary calls, not open Phases).
            Err(status)
                if matches!(status.code(), Code::Unimplemented | Code::PermissionDenied) =>
            {
                tracing::info!(
                    endpoint,
                    "participant does not serve Phases to this coordinator ({}); unary calls",
                    status.message()
                );
                self.unary_only.store(true, Ordering::Relaxed);
                return Err(CallError::Unsupported);
            }
            Err(status) => return Err(CallError::Failed(status)),
        };
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let open = Arc::new(Open {
            requests,
            waiting: Arc::clone(&waiting),
        });
        let endpoint = endpoint.to_string();
        tokio::spawn(async move {
            let end = loop {
                match replies.message().await {
                    Ok(Some(reply)) => {
                        let waiter = waiting.lock().unwrap().calls.remove(&reply.call);
                        // No waiter: the caller gave up. No result: a malformed reply, which
                        // fails the call as a broken stream does.
                        if let (Some(waiter), Some(result)) = (waiter, reply.result) {
                            let _ = waiter.send(result);
                        }
                    }
                    Ok(None) => break "ended".to_string(),
                    Err(status) => break format!("broke: {}", status.message()),
                }
            };
            let mut waiting = waiting.lock().unwrap();
            tracing::debug!(
                endpoint,
                open_calls = waiting.calls.len(),
                "Phases stream {end}"
            );
            waiting.closed = true;
            // Dropping the senders fails every call still waiting, at once.
            waiting.calls.clear();
        });
        *stream = Some(Arc::clone(&open));
        opened.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("twopc_phase_streams_opened_total").increment(1);
        Ok(open)
    }
}

/// Takes a call's entry out when its caller stops waiting, answered or not.
struct Forget<'a> {
    waiting: &'a Mutex<Waiting>,
    call: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.waiting.lock().unwrap().calls.remove(&self.call);
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
                    .serve_with_incoming_shutdown(crate::proto::incoming(listener), shutdown)
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
