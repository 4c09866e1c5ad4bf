//! Sagas from Rust (docs/SAGAS.md): a plan built step by step, submitted once, and waited for.
//!
//! ```no_run
//! # async fn example(client: &twopc::client::Client) -> Result<(), twopc::client::Error> {
//! use twopc::client::saga::{Saga, SagaState};
//!
//! let (inventory, orders) = ("http://127.0.0.1:50061", "http://127.0.0.1:50062");
//! let saga = Saga::new("order-17")
//!     .step("reserve")
//!     .action(inventory, "UPDATE stock SET n = n - 1 WHERE item = $1", &[&"book"])
//!     .compensation(inventory, "UPDATE stock SET n = n + 1 WHERE item = $1", &[&"book"])
//!     .step("order")
//!     .action(orders, "INSERT INTO orders (item) VALUES ($1) RETURNING id", &[&"book"])
//!     // $1: the id the action returned, read back from its barrier row.
//!     .compensation(orders, "DELETE FROM orders WHERE id = $1", &[])
//!     .bind_outputs()
//!     .submit(client)
//!     .await?;
//! let ended = saga.wait(std::time::Duration::from_secs(30)).await?;
//! assert_eq!(ended.state, SagaState::Completed);
//! # Ok(()) }
//! ```
//!
//! Submitting is idempotent (the saga id is the key), so it is retried on transient errors
//! like Commit; a plan the coordinator refuses comes back as [`Error::Invalid`].

use super::value::{Rows, ToValue};
use super::{Client, Error};
use crate::proto::{self, saga_call::Call};
use std::time::{Duration, Instant};

pub use crate::proto::{SagaState, SagaStepState};

/// A saga's plan, built step by step: [`Saga::step`] starts a step, and what follows it
/// (its action, compensation, dependencies) applies to that step.
#[derive(Clone, Debug)]
pub struct Saga {
    request: proto::SubmitSagaRequest,
    /// The half of the current step the last call added to, for [`Saga::bind_outputs`].
    compensating: bool,
}

impl Saga {
    /// A saga whose id (chosen by the caller: the idempotency key) is `id`.
    pub fn new(id: &str) -> Saga {
        Saga {
            request: proto::SubmitSagaRequest {
                saga_id: id.to_string(),
                steps: Vec::new(),
                options: None,
            },
            compensating: false,
        }
    }

    /// Starts the step `name`. Without any [`Saga::depends_on`], steps run in the order given.
    pub fn step(mut self, name: &str) -> Saga {
        self.request.steps.push(proto::SagaStepPlan {
            name: name.to_string(),
            ..Default::default()
        });
        self
    }

    fn last(&mut self) -> &mut proto::SagaStepPlan {
        if self.request.steps.is_empty() {
            // A call before the first `step` names a step the plan checks refuse clearly.
            self.request.steps.push(proto::SagaStepPlan::default());
        }
        self.request.steps.last_mut().expect("a step")
    }

    /// The step's action: `sql` with `params` on the participant at `participant` (its URL),
    /// in a local transaction of its own. Called again, adds a statement to the same
    /// transaction.
    pub fn action(
        mut self,
        participant: &str,
        sql: &str,
        params: &[&(dyn ToValue + Sync)],
    ) -> Saga {
        add(&mut self.last().action, participant, sql, params);
        self.compensating = false;
        self
    }

    /// The step's compensation, which undoes its action; as [`Saga::action`].
    pub fn compensation(
        mut self,
        participant: &str,
        sql: &str,
        params: &[&(dyn ToValue + Sync)],
    ) -> Saga {
        add(&mut self.last().compensation, participant, sql, params);
        self.compensating = true;
        self
    }

    /// The step's action as a call of `method` (`/package.Service/Method`) of the service at
    /// `endpoint`, with `request` as its request message. The service answers OK to succeed
    /// (the response is the step's output), FAILED_PRECONDITION (or INVALID_ARGUMENT,
    /// OUT_OF_RANGE, NOT_FOUND, ALREADY_EXISTS) to fail for good; anything else is retried. It
    /// runs its work with [`super::barrier`] so that a repeat applies once.
    pub fn action_grpc(
        mut self,
        endpoint: &str,
        method: &str,
        request: &impl prost::Message,
    ) -> Saga {
        self.last().action = Some(grpc(endpoint, method, request));
        self.compensating = false;
        self
    }

    /// The step's compensation as a call of a service's method; as [`Saga::action_grpc`], but
    /// whatever it answers but OK, it is sent again.
    pub fn compensation_grpc(
        mut self,
        endpoint: &str,
        method: &str,
        request: &impl prost::Message,
    ) -> Saga {
        self.last().compensation = Some(grpc(endpoint, method, request));
        self.compensating = true;
        self
    }

    /// The statements of the action or compensation just given take outputs after their own
    /// parameters: an action, the first row of each step it depends on (without
    /// [`Saga::depends_on`], the step before); a compensation, the first row its own action
    /// returned.
    pub fn bind_outputs(mut self) -> Saga {
        let compensating = self.compensating;
        let step = self.last();
        let call = match compensating {
            true => &mut step.compensation,
            false => &mut step.action,
        };
        if let Some(Call::Sql(sql)) = call.as_mut().and_then(|c| c.call.as_mut()) {
            sql.bind_outputs = true;
        }
        self
    }

    /// The step starts once these steps have succeeded (the plan becomes a DAG).
    pub fn depends_on(mut self, steps: &[&str]) -> Saga {
        self.last()
            .depends_on
            .extend(steps.iter().map(|s| s.to_string()));
        self
    }

    /// How steps are sent: a bound on each call, attempts per action, backoff between them,
    /// and what happens when an action's attempts run out.
    pub fn options(mut self, options: proto::SagaOptions) -> Saga {
        self.request.options = Some(options);
        self
    }

    /// The plan as it goes on the wire.
    pub fn request(&self) -> &proto::SubmitSagaRequest {
        &self.request
    }

    /// Submits the plan: `Ok` once it is durable and running (or, submitted before, as it
    /// stands).
    pub async fn submit(self, client: &Client) -> Result<Submitted, Error> {
        let saga = client
            .retried(|| async {
                client
                    .coordinator
                    .clone()
                    .submit_saga(self.request.clone())
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| saga_error(&s))
            })
            .await?;
        Ok(Submitted {
            client: client.clone(),
            view: SagaView::from(saga),
        })
    }
}

fn add(
    call: &mut Option<proto::SagaCall>,
    participant: &str,
    sql: &str,
    params: &[&(dyn ToValue + Sync)],
) {
    let statement = proto::Statement {
        sql: sql.to_string(),
        params: params.iter().map(|p| p.to_value()).collect(),
    };
    match call.as_mut().and_then(|c| c.call.as_mut()) {
        Some(Call::Sql(s)) => s.statements.push(statement),
        Some(Call::Grpc(_)) | None => {
            *call = Some(proto::SagaCall {
                call: Some(Call::Sql(proto::SqlCall {
                    participant: participant.to_string(),
                    statements: vec![statement],
                    bind_outputs: false,
                })),
            })
        }
    }
}

fn grpc(endpoint: &str, method: &str, request: &impl prost::Message) -> proto::SagaCall {
    proto::SagaCall {
        call: Some(Call::Grpc(proto::GrpcCall {
            endpoint: endpoint.to_string(),
            method: method.to_string(),
            request: request.encode_to_vec(),
        })),
    }
}

/// A refused plan or a saga id in use is the caller's to fix; the rest as any call.
fn saga_error(status: &tonic::Status) -> Error {
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            Error::Invalid(status.message().to_string())
        }
        _ => Error::from_status(status),
    }
}

/// A saga as the coordinator showed it.
#[derive(Clone, Debug, PartialEq)]
pub struct SagaView {
    pub id: String,
    pub state: SagaState,
    /// Why it compensates or is stuck.
    pub reason: String,
    pub steps: Vec<StepView>,
}

/// One step of a [`SagaView`].
#[derive(Clone, Debug, PartialEq)]
pub struct StepView {
    pub name: String,
    pub state: SagaStepState,
    pub attempts: u32,
    pub last_error: String,
    /// What its action returned: an SQL step's rows.
    pub output: Option<Rows>,
    /// A gRPC step's response message, encoded.
    pub response: Vec<u8>,
}

impl SagaView {
    /// Completed or compensated: nothing more will happen to it.
    pub fn is_final(&self) -> bool {
        matches!(self.state, SagaState::Completed | SagaState::Compensated)
    }

    /// The output of the step `name`, if it ran.
    pub fn output(&self, name: &str) -> Option<&Rows> {
        self.steps.iter().find(|s| s.name == name)?.output.as_ref()
    }
}

impl From<proto::Saga> for SagaView {
    fn from(s: proto::Saga) -> SagaView {
        SagaView {
            state: s.state(),
            id: s.saga_id,
            reason: s.reason,
            steps: s
                .steps
                .into_iter()
                .map(|st| StepView {
                    state: st.state(),
                    name: st.name,
                    attempts: st.attempts,
                    last_error: st.last_error,
                    response: st.response,
                    output: st.output.map(|o| Rows {
                        affected: o.rows_affected,
                        columns: o.columns,
                        rows: o.rows.into_iter().map(|r| r.values).collect(),
                    }),
                })
                .collect(),
        }
    }
}

/// A submitted saga.
pub struct Submitted {
    client: Client,
    /// As SubmitSaga answered.
    pub view: SagaView,
}

impl Submitted {
    /// Waits up to `timeout` for the saga to end (completed, compensated, or stuck for an
    /// operator); still running after that is [`Error::Rpc`] with DEADLINE_EXCEEDED.
    pub async fn wait(&self, timeout: Duration) -> Result<SagaView, Error> {
        self.client.wait_saga(&self.view.id, timeout).await
    }
}

impl Client {
    /// The saga `id` as it is now.
    pub async fn saga(&self, id: &str) -> Result<SagaView, Error> {
        self.get_saga(id, Duration::ZERO).await
    }

    /// Waits up to `timeout` for the saga `id` to end, as [`Submitted::wait`].
    pub async fn wait_saga(&self, id: &str, timeout: Duration) -> Result<SagaView, Error> {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let view = self.get_saga(id, left.min(Duration::from_secs(30))).await?;
            if view.is_final() || view.state == SagaState::Stuck {
                return Ok(view);
            }
            if Instant::now() >= until {
                return Err(Error::Rpc {
                    code: tonic::Code::DeadlineExceeded,
                    message: format!("saga {id} is still {:?} after {timeout:?}", view.state),
                });
            }
        }
    }

    async fn get_saga(&self, id: &str, wait: Duration) -> Result<SagaView, Error> {
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        self.retried(|| async {
            self.coordinator
                .clone()
                .get_saga(proto::GetSagaRequest {
                    saga_id: id.to_string(),
                    wait_ms,
                })
                .await
                .map(|r| SagaView::from(r.into_inner()))
                .map_err(|s| Error::from_status(&s))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_puts_each_call_on_the_step_it_follows() {
        let saga = Saga::new("o-1")
            .step("a")
            .action("http://p1", "UPDATE t SET n = n - $1", &[&1i64])
            .action("http://p1", "INSERT INTO log VALUES ($1)", &[&"a"])
            .compensation("http://p1", "UPDATE t SET n = n + $1", &[&1i64])
            .step("b")
            .action(
                "http://p2",
                "INSERT INTO o DEFAULT VALUES RETURNING id",
                &[],
            )
            .compensation("http://p2", "DELETE FROM o WHERE id = $1", &[])
            .bind_outputs()
            .depends_on(&["a"]);
        let req = saga.request();
        assert_eq!(req.steps.len(), 2);
        let Some(Call::Sql(a)) = req.steps[0].action.as_ref().and_then(|c| c.call.clone()) else {
            panic!("a's action")
        };
        assert_eq!(
            a.statements.len(),
            2,
            "one local transaction, two statements"
        );
        assert!(!a.bind_outputs);
        let Some(Call::Sql(b)) = req.steps[1]
            .compensation
            .as_ref()
            .and_then(|c| c.call.clone())
        else {
            panic!("b's compensation")
        };
        assert!(b.bind_outputs);
        let Some(Call::Sql(b)) = req.steps[1].action.as_ref().and_then(|c| c.call.clone()) else {
            panic!("b's action")
        };
        assert!(!b.bind_outputs, "only the compensation binds");
        assert_eq!(req.steps[1].depends_on, ["a"]);
    }
}
