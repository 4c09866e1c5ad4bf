//! Sagas over real PostgreSQL (docs/SAGAS.md): the order saga of our users' design, on an
//! inventory database and an orders database, driven by the coordinator; and the barrier, step
//! by step, as a participant runs it.

use crate::support;

use support::{System, int, text};
use twopc::proto::{self, SagaState, SagaStepOutcome, SagaStepState, saga_call::Call};

const SCHEMA: &str = "
    CREATE TABLE stock (item text PRIMARY KEY, n int NOT NULL CHECK (n >= 0));
    INSERT INTO stock VALUES ('book', 5);
    CREATE TABLE orders (id serial PRIMARY KEY, item text NOT NULL);
    CREATE TABLE payments (order_id int PRIMARY KEY, amount int NOT NULL CHECK (amount <= 100));";

/// A system of `databases` databases, each with the shop's tables.
async fn shop(databases: usize) -> System {
    System::builder()
        .databases(databases)
        .schema(SCHEMA)
        .start()
        .await
        .unwrap()
}

/// One half of a step: `sql` with `params` on participant `i`.
fn sql(
    sys: &System,
    i: usize,
    sql: &str,
    params: Vec<proto::Value>,
    bind: bool,
) -> proto::SagaCall {
    proto::SagaCall {
        call: Some(Call::Sql(proto::SqlCall {
            participant: sys.participant_url(i),
            statements: vec![proto::Statement {
                sql: sql.into(),
                params,
            }],
            bind_outputs: bind,
        })),
    }
}

fn step(
    name: &str,
    action: proto::SagaCall,
    compensation: proto::SagaCall,
    depends_on: &[&str],
) -> proto::SagaStepPlan {
    proto::SagaStepPlan {
        name: name.into(),
        action: Some(action),
        compensation: Some(compensation),
        depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
    }
}

/// Reserve a book (inventory, database 0), create the order and take the payment (orders,
/// database 1); the payment's action binds the order's id, and the order's compensation its own.
fn order_saga(sys: &System, id: &str, amount: i64) -> proto::SubmitSagaRequest {
    proto::SubmitSagaRequest {
        saga_id: id.into(),
        steps: vec![
            step(
                "reserve",
                sql(
                    sys,
                    0,
                    "UPDATE stock SET n = n - 1 WHERE item = $1 RETURNING n",
                    vec![text("book")],
                    false,
                ),
                sql(
                    sys,
                    0,
                    "UPDATE stock SET n = n + 1 WHERE item = $1",
                    vec![text("book")],
                    false,
                ),
                &[],
            ),
            step(
                "order",
                sql(
                    sys,
                    1,
                    "INSERT INTO orders (item) VALUES ($1) RETURNING id",
                    vec![text("book")],
                    false,
                ),
                sql(sys, 1, "DELETE FROM orders WHERE id = $1", vec![], true),
                &[],
            ),
            step(
                "pay",
                sql(
                    sys,
                    1,
                    "INSERT INTO payments (order_id, amount) VALUES ($2, $1) RETURNING order_id",
                    vec![int(amount)],
                    true,
                ),
                sql(
                    sys,
                    1,
                    "DELETE FROM payments WHERE order_id = $1",
                    vec![],
                    true,
                ),
                &[],
            ),
        ],
        options: Some(proto::SagaOptions {
            initial_backoff_ms: 10,
            max_backoff_ms: 100,
            ..Default::default()
        }),
    }
}

/// The saga once it has ended (GetSaga waits up to 10 s).
async fn ended(sys: &System, id: &str) -> proto::Saga {
    sys.coordinator()
        .await
        .get_saga(proto::GetSagaRequest {
            saga_id: id.into(),
            wait_ms: 10_000,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn submit(sys: &System, req: proto::SubmitSagaRequest) -> Result<proto::Saga, tonic::Status> {
    sys.coordinator()
        .await
        .submit_saga(req)
        .await
        .map(|r| r.into_inner())
}

fn state(s: &proto::Saga) -> SagaState {
    SagaState::try_from(s.state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_saga_reserves_orders_and_pays() {
    let sys = shop(2).await;

    submit(&sys, order_saga(&sys, "order-1", 50)).await.unwrap();
    let saga = ended(&sys, "order-1").await;

    assert_eq!(state(&saga), SagaState::Completed, "{}", saga.reason);
    assert_eq!(sys.scalar(0, "SELECT n::int8 FROM stock").await, 4);
    let order = sys.scalar(1, "SELECT id::int8 FROM orders").await;
    assert_eq!(
        sys.scalar(1, "SELECT order_id::int8 FROM payments").await,
        order,
        "pay bound the order's id"
    );
    let out = saga.steps[1].output.as_ref().expect("the order's output");
    assert_eq!(out.rows[0].values[0], int(order));
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_that_fails_compensates_the_order_and_the_reservation_in_reverse() {
    let sys = shop(2).await;

    submit(&sys, order_saga(&sys, "order-2", 500))
        .await
        .unwrap();
    let saga = ended(&sys, "order-2").await;

    assert_eq!(state(&saga), SagaState::Compensated);
    assert!(
        saga.reason.contains("23514"),
        "the CHECK's SQLSTATE: {}",
        saga.reason
    );
    assert_eq!(
        sys.scalar(0, "SELECT n::int8 FROM stock").await,
        5,
        "reservation undone"
    );
    assert_eq!(
        sys.scalar(1, "SELECT count(*) FROM orders").await,
        0,
        "order deleted by its id"
    );
    assert_eq!(sys.scalar(1, "SELECT count(*) FROM payments").await, 0);
    let steps: Vec<_> = saga
        .steps
        .iter()
        .map(|s| SagaStepState::try_from(s.state).unwrap())
        .collect();
    assert_eq!(steps, [SagaStepState::Compensated; 3]);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_saga_reserves_and_orders_at_once_then_pays_with_both_outputs() {
    let sys = shop(2).await;
    let mut req = order_saga(&sys, "order-3", 20);
    req.steps[0].depends_on = vec![];
    req.steps[1].depends_on = vec![];
    req.steps[2].depends_on = vec!["reserve".into(), "order".into()];
    // Inputs: reserve's first row (n), then order's (id).
    req.steps[2].action = Some(sql(
        &sys,
        1,
        "INSERT INTO payments (order_id, amount) SELECT $3, $1 WHERE $2::int >= 0 RETURNING order_id",
        vec![int(20)],
        true,
    ));

    submit(&sys, req).await.unwrap();
    let saga = ended(&sys, "order-3").await;

    assert_eq!(state(&saga), SagaState::Completed, "{}", saga.reason);
    let order = sys.scalar(1, "SELECT id::int8 FROM orders").await;
    assert_eq!(
        sys.scalar(1, "SELECT order_id::int8 FROM payments").await,
        order
    );
    assert_eq!(sys.scalar(0, "SELECT n::int8 FROM stock").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_cannot_be_reached_stops_stuck_and_bad_plans_are_refused() {
    let sys = shop(2).await;
    let nowhere = format!("http://{}", support::free_addr());
    let mut req = order_saga(&sys, "order-4", 10);
    req.steps.truncate(1);
    let mut unreachable = req.steps[0].clone();
    unreachable.name = "nowhere".into();
    if let Some(Call::Sql(s)) = unreachable.action.as_mut().and_then(|c| c.call.as_mut()) {
        s.participant = nowhere;
    }
    req.steps.push(unreachable);
    req.options = Some(proto::SagaOptions {
        attempts: 2,
        initial_backoff_ms: 10,
        step_timeout_ms: 1000,
        on_exhausted: proto::OnExhausted::Stop as i32,
        ..Default::default()
    });

    submit(&sys, req.clone()).await.unwrap();
    let saga = ended(&sys, "order-4").await;

    assert_eq!(state(&saga), SagaState::Stuck);
    assert_eq!(
        SagaStepState::try_from(saga.steps[1].state).unwrap(),
        SagaStepState::Exhausted
    );
    assert_eq!(saga.steps[1].attempts, 2);
    assert!(saga.reason.contains("2 attempts"), "{}", saga.reason);
    assert_eq!(
        sys.scalar(0, "SELECT n::int8 FROM stock").await,
        4,
        "reserved, left for an operator"
    );

    // An operator sees it and has it compensated.
    let coordinator = sys.coordinator_url();
    let (listed, table, _) =
        support::twopcctl(&["--coordinator", &coordinator, "sagas", "--state", "stuck"]).await;
    assert!(
        listed && table.contains("order-4") && table.contains("stuck"),
        "{table}"
    );
    let (shown, details, _) =
        support::twopcctl(&["--coordinator", &coordinator, "saga", "order-4"]).await;
    assert!(
        shown && details.contains("nowhere") && details.contains("exhausted"),
        "{details}"
    );
    let (decided, said, err) = support::twopcctl(&[
        "--coordinator",
        &coordinator,
        "saga",
        "order-4",
        "--compensate",
        "--operator",
        "alice",
    ])
    .await;
    assert!(
        decided && said.contains("compensate by alice"),
        "{said}{err}"
    );
    assert_eq!(state(&ended(&sys, "order-4").await), SagaState::Compensated);
    assert_eq!(
        sys.scalar(0, "SELECT n::int8 FROM stock").await,
        5,
        "the reservation undone"
    );
    let (again, _, err) = support::twopcctl(&[
        "--coordinator",
        &coordinator,
        "saga",
        "order-4",
        "--retry",
        "--operator",
        "alice",
    ])
    .await;
    assert!(!again && err.contains("FailedPrecondition"), "{err}");

    let mut other = req.clone();
    other.steps.pop();
    let conflict = submit(&sys, other).await.unwrap_err();
    assert_eq!(
        conflict.code(),
        tonic::Code::FailedPrecondition,
        "{conflict:?}"
    );
    let mut bad = req.clone();
    bad.saga_id = "order-5".into();
    bad.steps[0].compensation = None;
    let refused = submit(&sys, bad).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("its compensation"),
        "{}",
        refused.message()
    );
    let missing = sys
        .coordinator()
        .await
        .get_saga(proto::GetSagaRequest {
            saga_id: "never".into(),
            wait_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

/// A step as a coordinator sends it; secrets are fixed bytes, as only the barrier sees them.
fn barrier_step(op: proto::SagaOp, step: &str, sql: &str) -> proto::SagaStepRequest {
    let secret = |half: &str| format!("secret of {step} {half} ..........").into_bytes();
    proto::SagaStepRequest {
        saga_id: "s".into(),
        step: step.into(),
        op: op as i32,
        action_secret: secret("action"),
        compensation_secret: match op {
            proto::SagaOp::Compensate | proto::SagaOp::Forget => secret("compensate"),
            _ => vec![],
        },
        statements: vec![proto::Statement {
            sql: sql.into(),
            params: vec![],
        }],
        bind_outputs: false,
        inputs: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_barrier_runs_an_action_once_makes_a_late_one_a_no_op_and_is_out_of_a_clients_reach() {
    use proto::SagaOp::{Action, Compensate};
    let sys = shop(1).await;
    let mut p = sys.participant(0).await;
    let mut run = async |req| {
        let r: proto::SagaStepResponse = p.run_saga_step(req).await.unwrap().into_inner();
        (SagaStepOutcome::try_from(r.outcome).unwrap(), r.output)
    };
    const TAKE: &str = "UPDATE stock SET n = n - 1 RETURNING n";
    const GIVE: &str = "UPDATE stock SET n = n + 1";

    // An action, and its repeat: applied once, the repeat answers the first run's output.
    let (first, out) = run(barrier_step(Action, "a", TAKE)).await;
    let (again, out_again) = run(barrier_step(Action, "a", TAKE)).await;
    assert_eq!(
        (first, again),
        (SagaStepOutcome::Applied, SagaStepOutcome::Repeated)
    );
    assert_eq!(out, out_again);
    assert_eq!(sys.scalar(0, "SELECT n::int8 FROM stock").await, 4);

    // A compensation that overtakes its action: null, and the action can no longer run.
    let (null, _) = run(barrier_step(Compensate, "b", GIVE)).await;
    let (late, _) = run(barrier_step(Action, "b", TAKE)).await;
    assert_eq!(
        (null, late),
        (SagaStepOutcome::Null, SagaStepOutcome::Fenced)
    );
    assert_eq!(
        sys.scalar(0, "SELECT n::int8 FROM stock").await,
        4,
        "nothing of b applied"
    );

    // The compensation of a, and its repeat: undone once.
    let (undo, _) = run(barrier_step(Compensate, "a", GIVE)).await;
    let (undo_again, _) = run(barrier_step(Compensate, "a", GIVE)).await;
    assert_eq!(
        (undo, undo_again),
        (SagaStepOutcome::Applied, SagaStepOutcome::Repeated)
    );
    assert_eq!(sys.scalar(0, "SELECT n::int8 FROM stock").await, 5);

    // A statement that fails for good: nothing of it, nor its barrier row, applied.
    let (failed, _) = run(barrier_step(Action, "c", "UPDATE stock SET n = -1")).await;
    assert_eq!(failed, SagaStepOutcome::Failed);
    let (retried, _) = run(barrier_step(Action, "c", TAKE)).await;
    assert_eq!(
        retried,
        SagaStepOutcome::Applied,
        "no barrier row was left by the failure"
    );

    // Retention: a final saga's step rows are forgotten by their secrets, and only those.
    let rows = async || {
        sys.pgs[0]
            .admin_scalar("SELECT count(*) FROM twopc.saga_barrier")
            .await
            .unwrap()
    };
    let before = rows().await;
    let (forgot, _) = run(barrier_step(proto::SagaOp::Forget, "a", "")).await;
    assert_eq!(forgot, SagaStepOutcome::Applied);
    assert_eq!(rows().await, before - 2, "a's action and compensation rows");

    // A client's SQL cannot write the barrier: no forged fence, no forged "already ran".
    let txn = sys.begin().await;
    let forged = sys
        .exec(
            0,
            &txn,
            "INSERT INTO twopc.saga_barrier (key, kind) VALUES ('\\x00', 'fence')",
            vec![],
        )
        .await
        .unwrap_err();
    assert!(
        forged.message().contains("permission denied"),
        "{}",
        forged.message()
    );
    sys.abort(&txn).await;
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_sdk_builds_submits_and_waits_for_the_order_saga() {
    use std::time::Duration;
    use twopc::client::saga::{Saga, SagaState};
    let sys = shop(2).await;
    let client = twopc::client::Client::connect(&sys.coordinator_url()).unwrap();
    let (inventory, orders) = (sys.participant_url(0), sys.participant_url(1));
    let order = |id: &str, amount: i64| {
        Saga::new(id)
            .step("reserve")
            .action(
                &inventory,
                "UPDATE stock SET n = n - 1 WHERE item = $1 RETURNING n",
                &[&"book"],
            )
            .compensation(
                &inventory,
                "UPDATE stock SET n = n + 1 WHERE item = $1",
                &[&"book"],
            )
            .step("order")
            .action(
                &orders,
                "INSERT INTO orders (item) VALUES ($1) RETURNING id",
                &[&"book"],
            )
            .compensation(&orders, "DELETE FROM orders WHERE id = $1", &[])
            .bind_outputs()
            .step("pay")
            .action(
                &orders,
                "INSERT INTO payments (order_id, amount) VALUES ($2, $1) RETURNING order_id",
                &[&amount],
            )
            .bind_outputs()
            .compensation(&orders, "DELETE FROM payments WHERE order_id = $1", &[])
            .bind_outputs()
    };

    let paid = order("sdk-1", 30).submit(&client).await.unwrap();
    let paid = paid.wait(Duration::from_secs(10)).await.unwrap();
    let declined = order("sdk-2", 300).submit(&client).await.unwrap();
    let declined = declined.wait(Duration::from_secs(10)).await.unwrap();
    let resubmitted = order("sdk-1", 30).submit(&client).await.unwrap();
    let conflict = order("sdk-1", 31).submit(&client).await.err();

    assert_eq!(paid.state, SagaState::Completed, "{}", paid.reason);
    assert_eq!(paid.output("reserve").unwrap().scalar::<i64>().unwrap(), 4);
    let order_id: i64 = paid.output("order").unwrap().scalar().unwrap();
    assert_eq!(
        sys.scalar(1, "SELECT order_id::int8 FROM payments").await,
        order_id
    );
    assert_eq!(declined.state, SagaState::Compensated);
    assert!(declined.reason.contains("23514"), "{}", declined.reason);
    assert_eq!(
        resubmitted.view.state,
        SagaState::Completed,
        "the same saga"
    );
    assert!(
        matches!(&conflict, Some(twopc::client::Error::Invalid(m)) if m.contains("another plan")),
        "{conflict:?}"
    );
    assert_eq!(sys.scalar(0, "SELECT n::int8 FROM stock").await, 4);
    assert_eq!(sys.scalar(1, "SELECT count(*) FROM orders").await, 1);
}

#[allow(dead_code)] // its `main` is the example's
#[path = "../../examples/payments.rs"]
mod payments;

use payments::pb as payments_pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_step_charges_once_though_its_reply_is_lost_and_is_refunded_when_a_later_step_fails()
{
    use std::time::Duration;
    use twopc::client::saga::{Saga, SagaState};
    let sys = shop(3).await;
    let db = sys.pgs[2].client().await.unwrap();
    let (listener, addr) = support::listener().await;
    let payments = payments::Payments::new(db, 100).await.unwrap();
    payments
        .lose_replies
        .store(1, std::sync::atomic::Ordering::SeqCst);
    tokio::spawn(payments::serve(listener, payments, std::future::pending()));
    let payments_url = support::url(addr);
    let client = twopc::client::Client::connect(&sys.coordinator_url()).unwrap();
    let (inventory, orders) = (sys.participant_url(0), sys.participant_url(1));
    // Reserve a book, pay for it (gRPC), then record the order: a bad item fails the order
    // (a CHECK on the item), and the payment is refunded.
    let order = |id: &str, amount: i64, item: &str| {
        let charge = payments_pb::ChargeRequest {
            order: id.into(),
            amount,
        };
        Saga::new(id)
            .step("reserve")
            .action(
                &inventory,
                "UPDATE stock SET n = n - 1 WHERE item = 'book'",
                &[],
            )
            .compensation(
                &inventory,
                "UPDATE stock SET n = n + 1 WHERE item = 'book'",
                &[],
            )
            .step("pay")
            .action_grpc(&payments_url, "/payments.v1.Payments/Charge", &charge)
            .compensation_grpc(&payments_url, "/payments.v1.Payments/Refund", &charge)
            .step("order")
            .action(&orders, "INSERT INTO orders (item) VALUES ($1)", &[&item])
            .compensation(&orders, "DELETE FROM orders WHERE item = $1", &[&item])
            .options(twopc::proto::SagaOptions {
                initial_backoff_ms: 10,
                ..Default::default()
            })
    };
    sys.setup_sql("ALTER TABLE orders ADD CONSTRAINT real_items CHECK (item <> 'nothing')")
        .await;
    let charges = || sys.pgs[2].scalar("SELECT count(*) FROM charges");

    let paid = order("g-1", 40, "book").submit(&client).await.unwrap();
    let paid = paid.wait(Duration::from_secs(10)).await.unwrap();
    let charged_once = charges().await.unwrap();
    let refunded = order("g-2", 40, "nothing").submit(&client).await.unwrap();
    let refunded = refunded.wait(Duration::from_secs(10)).await.unwrap();
    let declined = order("g-3", 400, "book").submit(&client).await.unwrap();
    let declined = declined.wait(Duration::from_secs(10)).await.unwrap();

    assert_eq!(paid.state, SagaState::Completed, "{}", paid.reason);
    assert_eq!(paid.steps[1].attempts, 2, "the lost reply was sent again");
    assert_eq!(
        charged_once, 1,
        "charged once: the repeat answered the first charge"
    );
    let reply =
        <payments_pb::ChargeReply as prost::Message>::decode(paid.steps[1].response.as_slice())
            .unwrap();
    assert!(reply.payment_id > 0, "the reply is the step's output");
    assert_eq!(
        refunded.state,
        SagaState::Compensated,
        "{}",
        refunded.reason
    );
    assert_eq!(declined.state, SagaState::Compensated);
    assert!(
        declined.reason.contains("card declined"),
        "{}",
        declined.reason
    );
    assert_eq!(declined.steps[1].attempts, 1, "a decline is not retried");
    assert_eq!(
        charges().await.unwrap(),
        1,
        "g-2's charge refunded, g-3's never made"
    );
    assert_eq!(
        sys.scalar(0, "SELECT n::int8 FROM stock").await,
        4,
        "only g-1 holds a book"
    );
    assert_eq!(sys.scalar(1, "SELECT count(*) FROM orders").await, 1);
}
