//! A submitted saga, checked (docs/SAGAS.md §2): the client's `SubmitSagaRequest` becomes the
//! machine's [`Saga`] and the [`Plan`] of what each step sends.
//!
//! Everything that can be refused is refused here, before the plan is written: a saga whose
//! third step could never run would otherwise apply two steps and then compensate them for a
//! mistake that was visible at submission. The plan is kept in the log as the client sent it
//! (`Saga::plan`), so a recovered saga reads it back through the same [`Plan::of`].

use super::error::Error;
use super::saga::{MAX_ATTEMPTS, OnExhausted, Saga};
use crate::participant::statement::check_allowed;
use crate::proto::{self, names};
use std::time::Duration;

/// The most steps one saga may have.
pub const MAX_STEPS: usize = 100;
/// The most bytes a plan may take in the log.
pub const MAX_PLAN_BYTES: usize = 1 << 20;
/// The longest a step's call, or a backoff, may be asked to take.
const MAX_DURATION: Duration = Duration::from_secs(3600);

/// How each step is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Bounds one call of a step.
    pub step_timeout: Duration,
    pub attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub on_exhausted: OnExhausted,
}

impl Options {
    /// How long to wait before the `attempt`-th send of a step's action or compensation
    /// (1: the first, at once), doubling up to the ceiling.
    pub fn backoff(&self, attempt: u32) -> Duration {
        match attempt {
            0 | 1 => Duration::ZERO,
            n => self
                .initial_backoff
                .saturating_mul(1u32 << (n - 2).min(20))
                .min(self.max_backoff),
        }
    }
}

/// One half of a step: what is sent, and where.
#[derive(Clone, Debug)]
pub enum Call {
    /// Statements a participant runs with the step's barrier row.
    Sql(proto::SqlCall),
    /// A unary method of the user's own service.
    Grpc(proto::GrpcCall),
}

impl Call {
    /// Where it goes.
    pub fn endpoint(&self) -> &str {
        match self {
            Call::Sql(s) => &s.participant,
            Call::Grpc(g) => &g.endpoint,
        }
    }
}

/// What each step sends: an action and a compensation.
#[derive(Clone, Debug)]
pub struct StepPlan {
    pub action: Call,
    pub compensation: Call,
}

/// A checked plan.
#[derive(Clone, Debug)]
pub struct Plan {
    pub steps: Vec<StepPlan>,
    pub options: Options,
}

impl Plan {
    /// Checks `req` (`endpoint` says whether this coordinator can dial a participant's URL)
    /// and builds the saga's machine, its plan stored in it.
    pub fn of(
        req: &proto::SubmitSagaRequest,
        endpoint: impl Fn(&str) -> Result<(), String>,
    ) -> Result<(Saga, Plan), Error> {
        let plan_err = |m: String| Error::Plan(m);
        names::check_saga_name("saga_id", &req.saga_id)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if req.steps.len() > MAX_STEPS {
            return Err(plan_err(format!(
                "{} steps; a saga has at most {MAX_STEPS}",
                req.steps.len()
            )));
        }
        let encoded = prost::Message::encode_to_vec(req);
        if encoded.len() > MAX_PLAN_BYTES {
            return Err(plan_err(format!(
                "the plan is {} bytes; at most {MAX_PLAN_BYTES}: keep data in the database, not in the plan",
                encoded.len()
            )));
        }
        let options = options(req.options.unwrap_or_default())?;
        let mut steps = Vec::with_capacity(req.steps.len());
        for s in &req.steps {
            names::check_saga_name("step name", &s.name)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            let call = |c: &Option<proto::SagaCall>, half: &str| {
                step_call(c.as_ref(), &endpoint)
                    .map_err(|m| plan_err(format!("step {:?}: its {half}: {m}", s.name)))
            };
            steps.push(StepPlan {
                action: call(&s.action, "action")?,
                compensation: call(&s.compensation, "compensation")?,
            });
        }
        let shape: Vec<(&str, Vec<&str>)> = req
            .steps
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.depends_on.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        let mut saga = Saga::new(&req.saga_id, &shape, options.attempts, options.on_exhausted)
            .map_err(|e| plan_err(e.to_string()))?;
        saga.plan = encoded;
        Ok((saga, Plan { steps, options }))
    }

    /// The plan a logged saga was submitted with.
    pub fn of_logged(saga: &Saga) -> Result<Plan, Error> {
        let req: proto::SubmitSagaRequest = prost::Message::decode(saga.plan.as_slice())
            .map_err(|e| Error::Plan(format!("saga {:?}: its logged plan: {e}", saga.id)))?;
        Ok(Plan::of(&req, |_| Ok(()))?.1)
    }
}

fn options(o: proto::SagaOptions) -> Result<Options, Error> {
    let ms = |v: u32, default: u64, field: &str| {
        let d = match v {
            0 => Duration::from_millis(default),
            n => Duration::from_millis(n.into()),
        };
        if d > MAX_DURATION {
            return Err(Error::Plan(format!(
                "options.{field} is {d:?}; at most {MAX_DURATION:?}"
            )));
        }
        Ok(d)
    };
    let attempts = match o.attempts {
        0 => 5,
        n if n > MAX_ATTEMPTS => {
            return Err(Error::Plan(format!(
                "options.attempts is {n}; at most {MAX_ATTEMPTS}"
            )));
        }
        n => n,
    };
    let initial_backoff = ms(o.initial_backoff_ms, 100, "initial_backoff_ms")?;
    let max_backoff = ms(o.max_backoff_ms, 10_000, "max_backoff_ms")?.max(initial_backoff);
    Ok(Options {
        step_timeout: ms(o.step_timeout_ms, 10_000, "step_timeout_ms")?,
        attempts,
        initial_backoff,
        max_backoff,
        on_exhausted: match o.on_exhausted() {
            proto::OnExhausted::Compensate => OnExhausted::Compensate,
            proto::OnExhausted::Stop => OnExhausted::Stop,
        },
    })
}

/// One half of a step: SQL on a participant, or a method of a service, that this coordinator
/// can dial.
fn step_call(
    call: Option<&proto::SagaCall>,
    endpoint: impl Fn(&str) -> Result<(), String>,
) -> Result<Call, String> {
    match call.and_then(|c| c.call.as_ref()) {
        Some(proto::saga_call::Call::Sql(sql)) => sql_call(sql, endpoint).map(Call::Sql),
        Some(proto::saga_call::Call::Grpc(grpc)) => grpc_call(grpc, endpoint).map(Call::Grpc),
        None => Err(
            "missing: give `sql` (a participant and its statements) or `grpc` (a service's method)"
                .into(),
        ),
    }
}

/// A method of a service: a URL this coordinator dials, and a method path.
fn grpc_call(
    grpc: &proto::GrpcCall,
    endpoint: impl Fn(&str) -> Result<(), String>,
) -> Result<proto::GrpcCall, String> {
    if grpc.endpoint.is_empty() {
        return Err("grpc.endpoint is empty: give the service's URL".into());
    }
    endpoint(&grpc.endpoint).map_err(|e| format!("grpc.endpoint: {e}"))?;
    let path_ok = grpc
        .method
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .is_some_and(|(service, method)| {
            !service.is_empty()
                && !method.is_empty()
                && !method.contains('/')
                && grpc
                    .method
                    .parse::<tonic::codegen::http::uri::PathAndQuery>()
                    .is_ok()
        });
    if !path_ok {
        return Err(format!(
            "grpc.method {:?} is not a method path: /package.Service/Method",
            crate::proto::shown(&grpc.method)
        ));
    }
    Ok(grpc.clone())
}

/// SQL on a participant, with statements a participant will run.
fn sql_call(
    sql: &proto::SqlCall,
    endpoint: impl Fn(&str) -> Result<(), String>,
) -> Result<proto::SqlCall, String> {
    if sql.participant.is_empty() {
        return Err("sql.participant is empty: give the participant's URL".into());
    }
    endpoint(&sql.participant).map_err(|e| format!("sql.participant: {e}"))?;
    for (i, s) in sql.statements.iter().enumerate() {
        let at = || format!("statement {} of {}", i + 1, sql.statements.len());
        check_allowed(&s.sql).map_err(|e| format!("{}: {e}", at()))?;
        if let Some(n) = s.params.iter().position(|v| v.kind.is_none()) {
            return Err(format!(
                "{}: parameter ${} has no value: set one of its fields (null_value: true for NULL)",
                at(),
                n + 1
            ));
        }
    }
    Ok(sql.clone())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proto::saga_call::Call;

    /// A step of `name` whose action and compensation each run one statement at `endpoint`.
    pub(crate) fn step(name: &str, endpoint: &str, depends_on: &[&str]) -> proto::SagaStepPlan {
        let sql = |text: &str| proto::SagaCall {
            call: Some(Call::Sql(proto::SqlCall {
                participant: endpoint.into(),
                statements: vec![proto::Statement {
                    sql: text.into(),
                    params: vec![],
                }],
                bind_outputs: false,
            })),
        };
        proto::SagaStepPlan {
            name: name.into(),
            action: Some(sql("UPDATE t SET n = n + 1")),
            compensation: Some(sql("UPDATE t SET n = n - 1")),
            depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn request(steps: Vec<proto::SagaStepPlan>) -> proto::SubmitSagaRequest {
        proto::SubmitSagaRequest {
            saga_id: "order-1".into(),
            steps,
            options: None,
        }
    }

    fn refused(req: &proto::SubmitSagaRequest) -> String {
        Plan::of(req, |_| Ok(())).unwrap_err().to_string()
    }

    #[test]
    fn a_plan_keeps_what_was_submitted_and_reads_back_from_the_log() {
        let req = request(vec![
            step("a", "http://p1", &[]),
            step("b", "http://p2", &[]),
        ]);
        let (saga, plan) = Plan::of(&req, |_| Ok(())).unwrap();
        assert_eq!(saga.steps.len(), 2);
        assert_eq!(plan.options.attempts, 5, "the default");
        let again = Plan::of_logged(&saga).unwrap();
        assert_eq!(again.steps[1].action.endpoint(), "http://p2");
    }

    #[test]
    fn a_plan_that_could_not_run_to_its_end_is_refused_before_anything_runs() {
        let mut no_comp = step("a", "http://p1", &[]);
        no_comp.compensation = None;
        assert!(refused(&request(vec![no_comp])).contains("its compensation: missing"));
        let mut bad_method = step("a", "http://p1", &[]);
        bad_method.action = Some(proto::SagaCall {
            call: Some(Call::Grpc(proto::GrpcCall {
                endpoint: "http://payments".into(),
                method: "Charge".into(),
                request: vec![],
            })),
        });
        assert!(refused(&request(vec![bad_method])).contains("/package.Service/Method"));
        let mut commit = step("a", "http://p1", &[]);
        if let Some(Call::Sql(s)) = commit.action.as_mut().and_then(|c| c.call.as_mut()) {
            s.statements[0].sql = "COMMIT".into();
        }
        assert!(refused(&request(vec![commit])).contains("statement 1 of 1"));
        assert!(
            refused(&request(vec![step("a", "http://p", &["nope"])])).contains("nope"),
            "an unknown dependency"
        );
        assert!(refused(&request(vec![])).contains("at least one step"));
        let mut bad_id = request(vec![step("a", "http://p", &[])]);
        bad_id.saga_id = "a b".into();
        assert!(refused(&bad_id).contains("saga_id"));
        let err = Plan::of(&request(vec![step("a", "https://p", &[])]), |_| {
            Err("this coordinator dials plaintext".into())
        })
        .unwrap_err();
        assert!(err.to_string().contains("plaintext"), "{err}");
    }

    #[test]
    fn backoff_doubles_from_the_second_attempt_up_to_its_ceiling() {
        let o = Options {
            step_timeout: Duration::from_secs(1),
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            on_exhausted: OnExhausted::Compensate,
        };
        let b: Vec<u64> = (1..=5).map(|n| o.backoff(n).as_millis() as u64).collect();
        assert_eq!(b, [0, 100, 200, 350, 350]);
        assert_eq!(o.backoff(u32::MAX), Duration::from_millis(350));
    }
}
