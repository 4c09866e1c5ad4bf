//! `demo --saga`: the order saga of our users' design (docs/SAGAS.md), on three throwaway
//! databases: `users` and `shop` behind a participant each, and `payments` owned by the
//! payments service (examples/payments.rs), which the saga calls over gRPC. Each order validates
//! the user, reserves the book, creates the order, and charges the card; a charge the card
//! declines is compensated in reverse (the order deleted by the id its step returned, the book
//! put back, the user's order count undone), and a good one completes. At the end, what each
//! database holds, and `twopcctl sagas`' view.

#[allow(dead_code)] // its `main` is the example's
#[path = "../../examples/payments.rs"]
mod payments;

use anyhow::{Result, bail};
use std::time::Duration;
use twopc::client::saga::{Saga, SagaState, SagaView};
use twopc::testkit::system::System;

const USERS: &str = "CREATE TABLE users (name text PRIMARY KEY, orders int NOT NULL DEFAULT 0);
    INSERT INTO users (name) VALUES ('alice'), ('bob');";
const SHOP: &str = "CREATE TABLE stock (item text PRIMARY KEY, n int NOT NULL CHECK (n >= 0));
    INSERT INTO stock VALUES ('book', 3);
    CREATE TABLE orders (id serial PRIMARY KEY, customer text NOT NULL, item text NOT NULL);";

pub async fn run(keep: bool) -> Result<()> {
    println!(
        "== Starting three throwaway PostgreSQL clusters (users, shop, payments), a coordinator, participants for users and shop, and the payments service"
    );
    let system = System::builder()
        .databases(3)
        .names(&["users", "shop", "payments"])
        .id("demo-saga")
        .start()
        .await?;
    system.pgs[0].client().await?.batch_execute(USERS).await?;
    system.pgs[1].client().await?.batch_execute(SHOP).await?;
    let (listener, addr) = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        (l, addr)
    };
    let service = payments::Payments::new(system.pgs[2].client().await?, 100).await?;
    tokio::spawn(payments::serve(listener, service, std::future::pending()));
    let client = twopc::client::Client::connect(&system.coordinator_url())?;
    let urls = Urls {
        users: system.participant_url(0),
        shop: system.participant_url(1),
        payments: format!("http://{addr}"),
    };
    println!(
        "== Up: coordinator {}, participants users {} and shop {}, payments service {}",
        system.coordinator_url(),
        urls.users,
        urls.shop,
        urls.payments
    );

    println!("\n== 1. alice orders the book for 40: validate, reserve, order, charge");
    let paid = order(&client, &urls, "order-alice", "alice", 40).await?;
    show(&paid);
    if paid.state != SagaState::Completed {
        bail!("alice's order should have completed: {}", paid.reason);
    }

    println!(
        "\n== 2. bob orders it for 400: the card declines, so the steps that ran are compensated in reverse"
    );
    let declined = order(&client, &urls, "order-bob", "bob", 400).await?;
    show(&declined);
    if declined.state != SagaState::Compensated {
        bail!(
            "bob's order should have been compensated: {}",
            declined.reason
        );
    }

    println!("\n== 3. carol is no user: the first step fails, nothing else runs");
    let unknown = order(&client, &urls, "order-carol", "carol", 10).await?;
    show(&unknown);

    println!("\n== What each database holds");
    let count = |i: usize, sql: &'static str| {
        let pg = std::sync::Arc::clone(&system.pgs[i]);
        async move { pg.scalar(sql).await }
    };
    let (stock, orders, charges, alice) = (
        count(1, "SELECT n::int8 FROM stock").await?,
        count(1, "SELECT count(*) FROM orders").await?,
        count(2, "SELECT count(*) FROM charges").await?,
        count(0, "SELECT orders::int8 FROM users WHERE name = 'alice'").await?,
    );
    println!(
        "   shop: {stock} books in stock, {orders} order(s); payments: {charges} charge(s); alice has {alice} order(s)"
    );
    if (stock, orders, charges, alice) != (2, 1, 1, 1) {
        bail!("only alice's order should have left a trace");
    }
    println!("\n== The coordinator's sagas (ListSagas, as `twopcctl sagas` shows them)");
    let listed = system
        .coordinator()
        .await
        .list_sagas(twopc::proto::ListSagasRequest::default())
        .await?
        .into_inner()
        .sagas;
    for s in &listed {
        println!(
            "   {:<12} {:<12} {}",
            s.saga_id,
            s.state()
                .as_str_name()
                .trim_start_matches("SAGA_STATE_")
                .to_lowercase(),
            s.reason
        );
    }
    if keep {
        println!(
            "\n== Running until Ctrl-C. Try:\n   twopcctl --coordinator {} sagas\n   twopcctl --coordinator {} saga order-bob",
            system.coordinator_url(),
            system.coordinator_url()
        );
        std::future::pending::<()>().await;
    }
    println!("\n== Done: stopping the servers and removing the clusters");
    system.shutdown().await
}

struct Urls {
    users: String,
    shop: String,
    payments: String,
}

/// The order saga for `customer`, paying `amount`, run to its end.
async fn order(
    client: &twopc::client::Client,
    urls: &Urls,
    id: &str,
    customer: &str,
    amount: i64,
) -> Result<SagaView> {
    let charge = payments::pb::ChargeRequest {
        order: id.into(),
        amount,
    };
    let saga = Saga::new(id)
        .step("validate-user")
        // No such user: a division by zero (SQLSTATE 22012) fails the step for good.
        .action(
            &urls.users,
            "SELECT 1 / count(*)::int FROM users WHERE name = $1",
            &[&customer],
        )
        .action(
            &urls.users,
            "UPDATE users SET orders = orders + 1 WHERE name = $1",
            &[&customer],
        )
        .compensation(
            &urls.users,
            "UPDATE users SET orders = orders - 1 WHERE name = $1",
            &[&customer],
        )
        .step("reserve")
        .action(
            &urls.shop,
            "UPDATE stock SET n = n - 1 WHERE item = 'book'",
            &[],
        )
        .compensation(
            &urls.shop,
            "UPDATE stock SET n = n + 1 WHERE item = 'book'",
            &[],
        )
        .step("order")
        .action(
            &urls.shop,
            "INSERT INTO orders (customer, item) VALUES ($1, 'book') RETURNING id",
            &[&customer],
        )
        .compensation(&urls.shop, "DELETE FROM orders WHERE id = $1", &[])
        .bind_outputs()
        .step("charge")
        .action_grpc(&urls.payments, "/payments.v1.Payments/Charge", &charge)
        .compensation_grpc(&urls.payments, "/payments.v1.Payments/Refund", &charge);
    let submitted = saga.submit(client).await?;
    Ok(submitted.wait(Duration::from_secs(30)).await?)
}

fn show(saga: &SagaView) {
    println!(
        "   saga {}: {:?}{}",
        saga.id,
        saga.state,
        match saga.reason.as_str() {
            "" => String::new(),
            r => format!(" because {r}"),
        }
    );
    for s in &saga.steps {
        println!("     {:<14} {:?}", s.name, s.state);
    }
}
