//! The `twopc.v1.Participant` service under whatever a stranger on the network might send.
//!
//! Property tests in the manner of a fuzzer, as `coordinator/fuzz.rs` does for the
//! coordinator: random sequences of Execute, Prepare, Commit, Rollback, CommitOnePhase, Recover
//! and Waits with ids this run used, ids nobody used and arbitrary text, parameters of every kind,
//! SQL the participant refuses, and raw bytes decoded as each request, onto a participant over
//! an in-memory database and coordinator. Every call must answer within a bound, with a value
//! or a status a client can act on; and once every branch is rolled back, the database holds
//! no open and no prepared transaction: nothing leaks.

use super::branches::Participant;
use super::fake::{FakeCoordinator, FakeDatabase};
use super::service::Service;
use crate::process::fuzzing::{self, run_case, text};
use crate::proto::{self, TxnId, participant_server::Participant as _, value::Kind};
use proptest::prelude::*;
use prost::Message;
use tonic::{Request, Status};

/// The coordinator the fake enlists with.
const COORDINATOR: &str = "fz";

/// A txn id as a stranger might send one.
#[derive(Clone, Debug)]
enum Id {
    /// One of the few this case works on, so that calls meet the same branches.
    Known(u8),
    /// Anything at all.
    Text(String),
}

#[derive(Clone, Debug)]
enum Call {
    Execute(Id, String, Vec<proto::Value>),
    Prepare(Id, String),
    Commit(Id, u64, String),
    /// With an abort reason and SQLSTATE, either of them arbitrary.
    Rollback(Id, u64, String, String, String),
    Waits(u32),
    CommitOnePhase(Id, String, Vec<Id>),
    Recover(String),
    /// Arbitrary bytes decoded as the request of method `n` (modulo the methods).
    Raw(u8, Vec<u8>),
}

fn id() -> impl Strategy<Value = Id> {
    prop_oneof![
        6 => (0u8..4).prop_map(Id::Known),
        1 => text().prop_map(Id::Text),
    ]
}

/// Mostly our coordinator (or none, meaning it), sometimes another or nonsense.
fn coordinator_id() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        3 => Just(COORDINATOR.to_string()),
        1 => Just("another".to_string()),
        1 => text(),
    ]
}

/// What the fake database understands (writes, reads, a failure), what the participant
/// refuses, and anything else. Not "sleep": the fake waits on it for a cancel.
fn sql() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("UPDATE t SET x = 1".to_string()),
        2 => Just("SELECT 1".to_string()),
        1 => Just("INSERT INTO t VALUES (fail)".to_string()),
        1 => Just("COMMIT".to_string()),
        1 => Just("PREPARE TRANSACTION 'x'".to_string()),
        1 => Just("/* */ prepare s AS SELECT 1".to_string()),
        2 => text(),
    ]
    .prop_filter("the fake database waits for a cancel on sleep", |s| {
        !s.to_ascii_lowercase().contains("sleep")
    })
}

fn value() -> impl Strategy<Value = proto::Value> {
    prop_oneof![
        Just(None),
        any::<bool>().prop_map(|b| Some(Kind::NullValue(b))),
        any::<bool>().prop_map(|b| Some(Kind::BoolValue(b))),
        any::<i64>().prop_map(|i| Some(Kind::IntValue(i))),
        any::<f64>().prop_map(|f| Some(Kind::DoubleValue(f))),
        text().prop_map(|t| Some(Kind::TextValue(t))),
        proptest::collection::vec(any::<u8>(), 0..32).prop_map(|b| Some(Kind::BytesValue(b))),
    ]
    .prop_map(|kind| proto::Value { kind })
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        6 => (id(), sql(), proptest::collection::vec(value(), 0..4))
            .prop_map(|(i, s, p)| Call::Execute(i, s, p)),
        3 => (id(), coordinator_id()).prop_map(|(i, c)| Call::Prepare(i, c)),
        2 => (id(), any::<u64>(), coordinator_id()).prop_map(|(i, x, c)| Call::Commit(i, x, c)),
        2 => (id(), any::<u64>(), coordinator_id(), text(), text())
            .prop_map(|(i, x, c, r, s)| Call::Rollback(i, x, c, r, s)),
        1 => any::<u32>().prop_map(Call::Waits),
        2 => (id(), coordinator_id(), proptest::collection::vec(id(), 0..3))
            .prop_map(|(i, c, f)| Call::CommitOnePhase(i, c, f)),
        1 => coordinator_id().prop_map(Call::Recover),
        2 => (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(m, b)| Call::Raw(m, b)),
    ]
}

/// One case's participant, and the ids it works on.
struct Target {
    service: Service<FakeDatabase, FakeCoordinator>,
    db: FakeDatabase,
    known: [String; 4],
}

impl Target {
    fn new() -> Target {
        let db = FakeDatabase::default();
        let deadline = crate::process::clock::now_ms() + 60_000;
        let coordinator = FakeCoordinator::new(COORDINATOR, deadline);
        let core = Participant::new("p1".into(), "http://p1".into(), db.clone(), coordinator);
        Target {
            service: Service::new(core),
            db,
            known: std::array::from_fn(|_| TxnId::generate().to_string()),
        }
    }

    fn id(&self, id: &Id) -> String {
        match id {
            Id::Known(i) => self.known[usize::from(*i) % self.known.len()].clone(),
            Id::Text(s) => s.clone(),
        }
    }

    fn branch(&self, id: &Id, xid: u64, coordinator_id: &str) -> proto::BranchRequest {
        proto::BranchRequest {
            txn_id: self.id(id),
            xid,
            coordinator_id: coordinator_id.to_string(),
            ..Default::default()
        }
    }

    /// Raw bytes as a request of one of the methods; bytes that do not decode are what tonic
    /// itself refuses, before any of our code runs.
    async fn raw(&self, method: u8, bytes: &[u8]) -> Result<(), Status> {
        let s = &self.service;
        macro_rules! call {
            ($ty:ty, $method:ident) => {
                match <$ty>::decode(bytes) {
                    Ok(req) => s.$method(Request::new(req)).await.map(drop),
                    Err(_) => Ok(()),
                }
            };
        }
        match method % 8 {
            0 => call!(proto::ExecuteRequest, execute),
            1 => call!(proto::PrepareRequest, prepare),
            2 => call!(proto::BranchRequest, commit),
            3 => call!(proto::BranchRequest, rollback),
            4 => call!(proto::CommitOnePhaseRequest, commit_one_phase),
            5 => call!(proto::WaitsRequest, waits),
            6 => call!(proto::SagaStepRequest, run_saga_step),
            _ => call!(proto::RecoverRequest, recover),
        }
    }
}

impl fuzzing::Target for Target {
    type Call = Call;

    async fn call(&mut self, call: &Call) -> Result<(), Status> {
        let s = &self.service;
        match call {
            Call::Execute(id, sql, params) => s
                .execute(Request::new(proto::ExecuteRequest {
                    txn_id: self.id(id),
                    sql: sql.clone(),
                    params: params.clone(),
                    ..Default::default()
                }))
                .await
                .map(drop),
            Call::Prepare(id, c) => s
                .prepare(Request::new(proto::PrepareRequest {
                    txn_id: self.id(id),
                    coordinator_id: c.clone(),
                }))
                .await
                .map(drop),
            Call::Commit(id, xid, c) => s
                .commit(Request::new(self.branch(id, *xid, c)))
                .await
                .map(drop),
            Call::Rollback(id, xid, c, reason, sqlstate) => s
                .rollback(Request::new(proto::BranchRequest {
                    abort_reason: reason.clone(),
                    abort_sqlstate: sqlstate.clone(),
                    ..self.branch(id, *xid, c)
                }))
                .await
                .map(drop),
            Call::Waits(min_wait_ms) => s
                .waits(Request::new(proto::WaitsRequest {
                    min_wait_ms: *min_wait_ms,
                }))
                .await
                .map(drop),
            Call::CommitOnePhase(id, c, forget) => s
                .commit_one_phase(Request::new(proto::CommitOnePhaseRequest {
                    txn_id: self.id(id),
                    coordinator_id: c.clone(),
                    // Any bytes: too short, empty and well-formed secrets alike.
                    marker_secret: self.id(id).into_bytes(),
                    forget_secrets: forget.iter().map(|f| self.id(f).into_bytes()).collect(),
                }))
                .await
                .map(drop),
            Call::Recover(c) => s
                .recover(Request::new(proto::RecoverRequest {
                    coordinator_id: c.clone(),
                }))
                .await
                .map(drop),
            Call::Raw(method, bytes) => self.raw(*method, bytes).await,
        }
    }

    /// Rolls back every branch the case worked on and reports anything left open or prepared.
    async fn leftovers(&self) -> Option<String> {
        for txn_id in &self.known {
            let _ = self
                .service
                .rollback(Request::new(proto::BranchRequest {
                    txn_id: txn_id.clone(),
                    xid: 0,
                    coordinator_id: COORDINATOR.into(),
                    ..Default::default()
                }))
                .await;
        }
        let (open, prepared) = (self.db.open_transactions(), self.db.prepared());
        (open > 0 || !prepared.is_empty())
            .then(|| format!("after rolling every branch back: {open} open, prepared {prepared:?}"))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_sequence_of_requests_gets_actionable_answers_and_leaks_nothing(
        calls in proptest::collection::vec(call(), 1..24)
    ) {
        if let Err(problem) = run_case(Target::new, &calls) {
            prop_assert!(false, "{}", problem);
        }
    }
}
