//! The `twopc.v1.Coordinator` service under whatever a stranger on the network might send.
//!
//! Property tests in the manner of a fuzzer: each case is a random sequence of calls, every
//! field drawn from ids this run handed out, ids nobody made, and arbitrary text and numbers
//! (enum values out of range too), plus raw bytes decoded as each request. The calls go
//! through the service as tonic would deliver them, onto a coordinator over an in-memory log
//! and in-memory participants. Whatever the input, a call must answer within a bound, with a
//! value or a status a client can act on (never INTERNAL or UNKNOWN), and once every
//! transaction is aborted the coordinator holds nothing live and no participant holds anything
//! prepared: nothing leaks.

use super::log::MemLog;
use super::participants::fake::FakeParticipants;
use super::service::Service;
use super::transactions::{Coordinator, Limits};
use crate::process::fuzzing::{self, run_case, text};
use crate::proto::{self, TxnId, coordinator_server::Coordinator as _};
use proptest::prelude::*;
use prost::Message;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Status};

/// A txn id as a stranger might send one.
#[derive(Clone, Debug)]
enum Id {
    /// One that Begin returned in this case (by index, modulo how many there are).
    Begun(usize),
    /// Well formed, but nobody began it.
    Unknown,
    /// Anything at all.
    Text(String),
}

#[derive(Clone, Debug)]
enum Call {
    Begin(u32, String),
    Commit(Id),
    Abort(Id, String),
    Get(Id),
    List(Vec<i32>, u32),
    Register {
        id: Id,
        participant: String,
        endpoint: String,
        instance: String,
        one_phase: bool,
    },
    Query(Id, String),
    Resolve(Id, i32, String),
    LockWaits(u32),
    /// A saga of steps (name, depends_on, endpoint, sql), options drawn at random.
    Saga {
        id: String,
        steps: Vec<(String, Vec<String>, String, String)>,
        attempts: u32,
        on_exhausted: i32,
    },
    GetSaga(String, u32),
    /// Arbitrary bytes decoded as the request of method `n` (modulo the methods); called if
    /// they decode.
    Raw(u8, Vec<u8>),
}

fn id() -> impl Strategy<Value = Id> {
    prop_oneof![
        4 => any::<usize>().prop_map(Id::Begun),
        1 => Just(Id::Unknown),
        1 => text().prop_map(Id::Text),
    ]
}

/// Mostly a few names, so that steps depend on each other and submits repeat.
fn saga_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(str::to_string),
        1 => text(),
    ]
}

/// Mostly the two fake participants, so that enlistment succeeds and commits run.
fn endpoint() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("http://p1".to_string()),
        3 => Just("http://p2".to_string()),
        1 => text(),
    ]
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        3 => (any::<u32>(), text()).prop_map(|(t, l)| Call::Begin(t % 120_000, l)),
        1 => (any::<u32>(), text()).prop_map(|(t, l)| Call::Begin(t, l)),
        2 => id().prop_map(Call::Commit),
        2 => (id(), text()).prop_map(|(i, r)| Call::Abort(i, r)),
        1 => id().prop_map(Call::Get),
        1 => (proptest::collection::vec(any::<i32>(), 0..4), any::<u32>())
            .prop_map(|(s, l)| Call::List(s, l)),
        4 => (id(), prop_oneof![Just("p1".to_string()), Just("p2".to_string()), text()],
              endpoint(), prop_oneof![Just("i1".to_string()), text()], any::<bool>())
            .prop_map(|(id, participant, endpoint, instance, one_phase)| Call::Register {
                id, participant, endpoint, instance, one_phase,
            }),
        1 => (id(), text()).prop_map(|(i, c)| Call::Query(i, c)),
        1 => (id(), any::<i32>(), text()).prop_map(|(i, r, why)| Call::Resolve(i, r, why)),
        1 => any::<u32>().prop_map(Call::LockWaits),
        2 => (saga_name(), proptest::collection::vec(
                (saga_name(), proptest::collection::vec(saga_name(), 0..2), endpoint(),
                 prop_oneof![Just("UPDATE t SET n = 1".to_string()), text()]),
                0..4),
              0..2000u32, any::<i32>())
            .prop_map(|(id, steps, attempts, on_exhausted)| Call::Saga {
                id, steps, attempts, on_exhausted,
            }),
        1 => (saga_name(), 0..200u32).prop_map(|(id, w)| Call::GetSaga(id, w)),
        2 => (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(m, b)| Call::Raw(m, b)),
    ]
}

/// One case's coordinator and what it has handed out.
struct Target {
    service: Service<MemLog, FakeParticipants>,
    core: Arc<Coordinator<MemLog, FakeParticipants>>,
    participants: FakeParticipants,
    begun: Vec<String>,
}

impl Target {
    fn new() -> Target {
        let participants = FakeParticipants::default();
        let limits = Limits {
            prepare_timeout: Duration::from_millis(200),
            commit_wait: Duration::from_millis(100),
            retry_min: Duration::from_millis(1),
            retry_max: Duration::from_millis(5),
            max_live: 8,
            max_branches: 2,
            ..Limits::default()
        };
        let core = Coordinator::with_participants(
            "fuzz".into(),
            MemLog::default(),
            participants.clone(),
            limits,
        )
        .unwrap();
        Target {
            service: Service::new(Arc::clone(&core)),
            core,
            participants,
            begun: Vec::new(),
        }
    }

    fn id(&self, id: &Id) -> String {
        match id {
            Id::Begun(i) if !self.begun.is_empty() => self.begun[i % self.begun.len()].clone(),
            Id::Begun(_) | Id::Unknown => TxnId::generate().to_string(),
            Id::Text(s) => s.clone(),
        }
    }

    /// Raw bytes as a request of one of the methods; bytes that do not decode are what tonic
    /// itself refuses, before any of our code runs.
    async fn raw(&mut self, method: u8, bytes: &[u8]) -> Result<(), Status> {
        let s = &self.service;
        macro_rules! call {
            ($ty:ty, $method:ident) => {
                match <$ty>::decode(bytes) {
                    Ok(req) => s.$method(Request::new(req)).await.map(drop),
                    Err(_) => Ok(()),
                }
            };
        }
        match method % 13 {
            0 => match proto::BeginRequest::decode(bytes) {
                Ok(req) => s
                    .begin(Request::new(req))
                    .await
                    .map(|r| self.begun.push(r.into_inner().txn_id)),
                Err(_) => Ok(()),
            },
            1 => call!(proto::CommitRequest, commit),
            2 => call!(proto::AbortRequest, abort),
            3 => call!(proto::GetTransactionRequest, get_transaction),
            4 => call!(proto::ListTransactionsRequest, list_transactions),
            5 => call!(proto::RegisterBranchRequest, register_branch),
            6 => call!(proto::QueryOutcomeRequest, query_outcome),
            7 => call!(proto::ListLockWaitsRequest, list_lock_waits),
            8 => call!(proto::ListParticipantsRequest, list_participants),
            9 => call!(proto::SubmitSagaRequest, submit_saga),
            10 => call!(proto::GetSagaRequest, get_saga),
            11 => call!(proto::ListSagasRequest, list_sagas),
            _ => call!(proto::ResolveTransactionRequest, resolve_transaction),
        }
    }
}

impl fuzzing::Target for Target {
    type Call = Call;

    async fn call(&mut self, call: &Call) -> Result<(), Status> {
        let s = &self.service;
        match call {
            Call::Begin(timeout_ms, label) => s
                .begin(Request::new(proto::BeginRequest {
                    timeout_ms: *timeout_ms,
                    label: label.clone(),
                }))
                .await
                .map(|r| self.begun.push(r.into_inner().txn_id)),
            Call::Commit(id) => s
                .commit(Request::new(proto::CommitRequest {
                    txn_id: self.id(id),
                    ..Default::default()
                }))
                .await
                .map(drop),
            Call::Abort(id, reason) => s
                .abort(Request::new(proto::AbortRequest {
                    txn_id: self.id(id),
                    reason: reason.clone(),
                    ..Default::default()
                }))
                .await
                .map(drop),
            Call::Get(id) => s
                .get_transaction(Request::new(proto::GetTransactionRequest {
                    txn_id: self.id(id),
                }))
                .await
                .map(drop),
            Call::List(states, limit) => s
                .list_transactions(Request::new(proto::ListTransactionsRequest {
                    states: states.clone(),
                    limit: *limit,
                }))
                .await
                .map(drop),
            Call::Register {
                id,
                participant,
                endpoint,
                instance,
                one_phase,
            } => s
                .register_branch(Request::new(proto::RegisterBranchRequest {
                    txn_id: self.id(id),
                    participant_id: participant.clone(),
                    endpoint: endpoint.clone(),
                    instance_id: instance.clone(),
                    one_phase: *one_phase,
                    ..Default::default()
                }))
                .await
                .map(drop),
            Call::Query(id, coordinator_id) => s
                .query_outcome(Request::new(proto::QueryOutcomeRequest {
                    txn_id: self.id(id),
                    coordinator_id: coordinator_id.clone(),
                }))
                .await
                .map(drop),
            Call::Resolve(id, resolution, reason) => s
                .resolve_transaction(Request::new(proto::ResolveTransactionRequest {
                    txn_id: self.id(id),
                    resolution: *resolution,
                    operator: "fuzz".into(),
                    reason: reason.clone(),
                }))
                .await
                .map(drop),
            Call::LockWaits(min_wait_ms) => s
                .list_lock_waits(Request::new(proto::ListLockWaitsRequest {
                    min_wait_ms: *min_wait_ms,
                }))
                .await
                .map(drop),
            Call::Saga {
                id,
                steps,
                attempts,
                on_exhausted,
            } => {
                let sql = |endpoint: &str, text: &str| proto::SagaCall {
                    call: Some(proto::saga_call::Call::Sql(proto::SqlCall {
                        participant: endpoint.into(),
                        statements: vec![proto::Statement {
                            sql: text.into(),
                            params: vec![],
                        }],
                        bind_outputs: true,
                    })),
                };
                let steps = steps
                    .iter()
                    .map(|(name, deps, endpoint, text)| proto::SagaStepPlan {
                        name: name.clone(),
                        action: Some(sql(endpoint, text)),
                        compensation: Some(sql(endpoint, text)),
                        depends_on: deps.clone(),
                    })
                    .collect();
                s.submit_saga(Request::new(proto::SubmitSagaRequest {
                    saga_id: id.clone(),
                    steps,
                    options: Some(proto::SagaOptions {
                        attempts: *attempts,
                        on_exhausted: *on_exhausted,
                        step_timeout_ms: 100,
                        initial_backoff_ms: 1,
                        max_backoff_ms: 5,
                    }),
                }))
                .await
                .map(drop)
            }
            Call::GetSaga(id, wait_ms) => s
                .get_saga(Request::new(proto::GetSagaRequest {
                    saga_id: id.clone(),
                    wait_ms: *wait_ms,
                }))
                .await
                .map(drop),
            Call::Raw(method, bytes) => self.raw(*method, bytes).await,
        }
    }

    /// Aborts everything begun, waits for phase 2 to finish, and reports anything left.
    async fn leftovers(&self) -> Option<String> {
        for id in &self.begun {
            let _ = self
                .service
                .abort(Request::new(proto::AbortRequest {
                    txn_id: id.clone(),
                    reason: "the case is over".into(),
                    ..Default::default()
                }))
                .await;
        }
        for _ in 0..500 {
            let prepared: Vec<TxnId> = ["http://p1", "http://p2"]
                .iter()
                .flat_map(|ep| self.participants.prepared(ep))
                .collect();
            let sagas_running = self
                .core
                .sagas
                .lock()
                .unwrap()
                .values()
                .any(|s| s.snapshot().state != super::saga::SagaState::Stuck);
            if self.core.live_count() == 0 && prepared.is_empty() && !sagas_running {
                return (self.participants.alarms() > 0)
                    .then(|| "a branch ended against its decision".to_string());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Some(format!(
            "{} transactions still live after every one was aborted, or a saga still running",
            self.core.live_count()
        ))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn any_sequence_of_requests_gets_actionable_answers_and_leaks_nothing(
        calls in proptest::collection::vec(call(), 1..24)
    ) {
        if let Err(problem) = run_case(Target::new, &calls) {
            prop_assert!(false, "{}", problem);
        }
    }
}
