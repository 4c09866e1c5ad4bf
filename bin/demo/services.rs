//! `demo --services`: services that each own their database, in one global transaction.
//!
//! Three throwaway PostgreSQL clusters, a coordinator, and the example services as processes of
//! their own: `ledger-a` and `ledger-b` (examples/ledger.rs) and `audit` (examples/audit.rs),
//! each with the participant embedded and no transaction code. The demo is a client service:
//! it moves money with `transact` around ordinary gRPC calls that carry the transaction in
//! metadata, and ledger-a's handler calls the audit service inside it. Then an overdraft that
//! aborts everywhere, and ledger-b killed at a named failpoint between its vote and its commit,
//! whose branch commits once it is back. The services are the examples' code, compiled into
//! this binary (`example_services.rs`) and run as `demo ledger …` and `demo audit …`; built
//! with the `testing` feature so that the failpoint exists (scripts/demo does).

use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tower_layer::Layer;
use twopc::client::propagation::{Propagate, PropagateLayer};
use twopc::client::{self, transact_with};
use twopc::coordinator;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::{self, ParticipantHealth};
use twopc::testkit::cluster::PgCluster;
use twopc::testkit::free_port;
use twopc::testkit::system::{Proc, Started, System, listen};

use crate::example_services::{AUDIT, LEDGER, ledger::pb};

type Ledger = pb::ledger_client::LedgerClient<Propagate<Channel>>;

/// The failpoint scene 3 arms in ledger-b.
const CRASH_POINT: &str = "participant::before_commit_prepared";

/// One example service, run as a process of its own and restartable on its port.
struct Service {
    /// This binary in `ledger` or `audit` mode (`example_services.rs`), logging to
    /// `<dir>/<name>.log`.
    proc: Proc,
}

impl Service {
    /// The example service `kind` (`ledger` or `audit`), named `name`, on its own port.
    fn new(
        name: &'static str,
        kind: &str,
        dir: &Path,
        coordinator: &str,
        pg: &PgCluster,
        extra: &[String],
    ) -> Result<Service> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let args: Vec<String> = [kind.to_string()]
            .into_iter()
            .chain(listen(addr))
            .chain(
                [
                    "--id",
                    name,
                    "--coordinator",
                    coordinator,
                    "--postgres",
                    &pg.conn_str(),
                    "--resolve-interval-ms",
                    "1000",
                ]
                .map(String::from),
            )
            .chain(extra.iter().cloned())
            .collect();
        let proc = Proc::new(name, std::env::current_exe()?, addr, args)
            .log_to(&dir.join(format!("{name}.log")));
        Ok(Service { proc })
    }

    fn url(&self) -> String {
        self.proc.url()
    }

    /// Starts it (with `failpoints` armed, if any) and waits until it serves.
    async fn start(&mut self, failpoints: Option<&str>) -> Result<()> {
        match self.proc.start(failpoints).await? {
            Started::Ready => Ok(()),
            Started::Died(status) => bail!("{} died as it started: {status}", self.proc.name),
        }
    }

    fn kill(&mut self) {
        self.proc.kill();
    }

    fn client(&self) -> Result<Ledger> {
        let channel = tonic::transport::Endpoint::from_shared(self.url())?.connect_lazy();
        Ok(pb::ledger_client::LedgerClient::new(
            PropagateLayer.layer(channel),
        ))
    }
}

/// What a scene looks at: alice's balance in each ledger and the audit service's records.
struct Databases<'a> {
    /// ledger-a's.
    a: &'a PgCluster,
    /// ledger-b's.
    b: &'a PgCluster,
    /// The audit service's.
    audit: &'a PgCluster,
}

impl Databases<'_> {
    async fn scalar(pg: &PgCluster, sql: &str) -> Result<i64> {
        pg.scalar(sql).await
    }

    async fn state(&self) -> Result<(i64, i64, i64)> {
        let alice = "SELECT coalesce(sum(balance), 0)::int8 FROM balances WHERE account = 'alice'";
        Ok((
            Self::scalar(self.a, alice).await?,
            Self::scalar(self.b, alice).await?,
            Self::scalar(self.audit, "SELECT count(*) FROM records").await?,
        ))
    }

    async fn show(&self) -> Result<(i64, i64, i64)> {
        let (a, b, audited) = self.state().await?;
        println!("   alice: ledger-a {a}, ledger-b {b}; audit records: {audited}");
        Ok((a, b, audited))
    }

    async fn prepared(&self) -> Result<i64> {
        let mut n = 0;
        for pg in [self.a, self.b, self.audit] {
            n += pg.prepared().await?;
        }
        Ok(n)
    }
}

/// Why a transfer failed: a ledger's answer, or the transaction's outcome.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("{:?}: {}", .0.code(), .0.message())]
    Ledger(#[from] tonic::Status),
    #[error(transparent)]
    Twopc(#[from] client::Error),
}

/// Posts `steps` (ledger, amount) for alice in one global transaction; its id and outcome.
async fn transfer(
    twopc: &client::Client,
    steps: &[(&Ledger, i64)],
    memo: &str,
) -> (String, Result<(), Failed>) {
    let mut id = String::new();
    let options = client::Options {
        label: memo.into(),
        ..client::Options::default()
    };
    let outcome = transact_with(twopc, options, |tx| {
        id = tx.id().to_string();
        let steps: Vec<(Ledger, i64)> = steps.iter().map(|(l, a)| ((*l).clone(), *a)).collect();
        async move {
            for (mut ledger, amount) in steps {
                ledger
                    .post(pb::PostRequest {
                        account: "alice".into(),
                        amount,
                        memo: memo.into(),
                    })
                    .await?;
            }
            Ok::<_, Failed>(())
        }
    })
    .await;
    (id, outcome)
}

pub async fn run(keep: bool) -> Result<()> {
    println!(
        "== Starting three throwaway PostgreSQL clusters (ledger-a, ledger-b and audit) and a coordinator"
    );
    let dir = tempfile::Builder::new()
        .prefix("twopc-services-demo-")
        .tempdir()?;
    // The coordinator runs in this process; its log goes beside the services' logs.
    let log = std::fs::File::create(dir.path().join("coordinator.log"))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log))
        .init();
    let system = System::builder()
        .databases(3)
        .no_participants()
        .id("demo")
        .limits(coordinator::Limits {
            health_check_interval: Some(Duration::from_millis(500)),
            // How long Commit waits for phase 2 before it answers with branches pending.
            commit_wait: Duration::from_secs(1),
            ..coordinator::Limits::default()
        })
        .start()
        .await?;
    let dbs = Databases {
        a: &system.pgs[0],
        b: &system.pgs[1],
        audit: &system.pgs[2],
    };
    let caddr = system.coordinator.addr;
    let coordinator_url = system.coordinator_url();
    let mut audit = Service::new("audit", AUDIT, dir.path(), &coordinator_url, dbs.audit, &[])?;
    audit.start(None).await?;
    let mut ledger_a = Service::new(
        "ledger-a",
        LEDGER,
        dir.path(),
        &coordinator_url,
        dbs.a,
        &["--audit".into(), audit.url()],
    )?;
    ledger_a.start(None).await?;
    let mut ledger_b = Service::new("ledger-b", LEDGER, dir.path(), &coordinator_url, dbs.b, &[])?;
    ledger_b.start(None).await?;
    println!(
        "== Up: coordinator {coordinator_url}; ledger-a {} (records every Post with audit), ledger-b {}, audit {}; each a process with its participant embedded (logs in {})",
        ledger_a.url(),
        ledger_b.url(),
        audit.url(),
        dir.path().display()
    );
    let twopc = client::Client::connect(&coordinator_url)?;
    let (la, lb) = (ledger_a.client()?, ledger_b.client()?);
    let mut coordinator = CoordinatorClient::connect(coordinator_url.clone()).await?;

    println!(
        "   alice opens her account in ledger-a with 100: a Post outside any transaction commits on its own"
    );
    la.clone()
        .post(pb::PostRequest {
            account: "alice".into(),
            amount: 100,
            memo: "opening".into(),
        })
        .await?;
    dbs.show().await?;

    println!(
        "\n== 1. alice moves 30 from ledger-a to ledger-b: transact {{ ledger-a.Post(-30); ledger-b.Post(+30) }},\n   and ledger-a's handler calls audit.Record inside the same transaction"
    );
    let (txn, outcome) = transfer(&twopc, &[(&la, -30), (&lb, 30)], "rent").await;
    println!("   txn {txn}: {}", describe(&outcome));
    let t = coordinator
        .get_transaction(proto::GetTransactionRequest {
            txn_id: txn.clone(),
        })
        .await?
        .into_inner();
    for br in &t.branches {
        println!(
            "   branch {} at {}: {:?}",
            br.participant_id,
            br.endpoint,
            br.state()
        );
    }
    if dbs.show().await? != (70, 30, 2) || outcome.is_err() {
        bail!("scene 1 should have committed in all three databases");
    }

    println!(
        "\n== 2. alice moves 500 but has 70: ledger-b credits her first, then ledger-a's CHECK (balance >= 0)\n   fails in its handler (FAILED_PRECONDITION), which dooms the transaction: the credit is undone too"
    );
    let (txn, outcome) = transfer(&twopc, &[(&lb, 500), (&la, -500)], "too much").await;
    println!("   txn {txn}: {}", describe(&outcome));
    if dbs.show().await? != (70, 30, 2) || outcome.is_ok() {
        bail!("scene 2 should have aborted everywhere");
    }

    println!(
        "\n== 3. ledger-b restarts with the failpoint {CRASH_POINT} armed, and dies between its\n   yes vote and its COMMIT PREPARED; the commit decision is durable at the coordinator"
    );
    ledger_b.kill();
    ledger_b
        .start(Some(&format!("{CRASH_POINT}=abort")))
        .await?;
    let (txn, outcome) = transfer(&twopc, &[(&la, -20), (&lb, 20)], "crash").await;
    println!(
        "   txn {txn}: {} (the decision is durable; after waiting 1 s for phase 2, Commit answers\n   with ledger-b's acknowledgement still owed, which the coordinator keeps asking for)",
        describe(&outcome)
    );
    let died = ledger_b
        .proc
        .wait_exit(Duration::from_secs(10))
        .await
        .context("ledger-b should have died at the failpoint")?;
    println!(
        "   ledger-b died ({died}); its database holds {} prepared transaction(s), alice's 20 not visible there yet:",
        dbs.b.prepared().await?
    );
    dbs.show().await?;
    let restarted = Instant::now();
    // Whoever is first commits it: the coordinator's retry, or ledger-b's resolver asking
    // the coordinator how the transaction ended.
    ledger_b.start(None).await?;
    while dbs.prepared().await? > 0 {
        if restarted.elapsed() > Duration::from_secs(30) {
            bail!("ledger-b's branch was not committed within 30 s of its restart");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "   ledger-b is back; its prepared branch committed {} ms after the restart:",
        restarted.elapsed().as_millis()
    );
    if dbs.show().await? != (50, 50, 3) || outcome.is_err() {
        bail!("scene 3 should have committed everywhere once ledger-b was back");
    }

    println!("\n== 4. the coordinator's registry of participants (twopcctl participants)");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let listed = coordinator
        .list_participants(proto::ListParticipantsRequest {})
        .await?
        .into_inner()
        .participants;
    for p in &listed {
        println!(
            "   {:<9} {}  instance {}  health {}",
            p.participant_id,
            p.endpoint,
            p.instance_id.chars().take(8).collect::<String>(),
            p.health()
                .as_str_name()
                .trim_start_matches("PARTICIPANT_HEALTH_")
                .to_lowercase()
        );
    }
    if listed.len() != 3
        || listed
            .iter()
            .any(|p| p.health() != ParticipantHealth::Serving)
    {
        bail!("every service should be enlisted and serving");
    }
    println!(
        "   prepared transactions left in PostgreSQL: {}",
        dbs.prepared().await?
    );

    if keep {
        println!(
            "\n== Still running. Join a Post to a transaction begun by hand (from this directory):"
        );
        println!(
            "   TXN=$(.venv/bin/grpcurl -plaintext -d '{{}}' {caddr} twopc.v1.Coordinator/Begin | jq -r .txnId)"
        );
        println!(
            "   .venv/bin/grpcurl -plaintext -H \"twopc-txn-id: $TXN\" -d '{{\"account\": \"alice\", \"amount\": 5, \"memo\": \"by hand\"}}' {} ledger.v1.Ledger/Post",
            ledger_b.url().trim_start_matches("http://")
        );
        println!(
            "   .venv/bin/grpcurl -plaintext -d \"{{\\\"txn_id\\\": \\\"$TXN\\\"}}\" {caddr} twopc.v1.Coordinator/Commit"
        );
        println!("   cargo run -q --bin twopcctl -- --coordinator {coordinator_url} participants");
        println!("   Ctrl-C stops everything and removes the clusters.");
        std::future::pending::<()>().await;
    }

    println!(
        "\n== Done: stopping the services and the coordinator, removing the clusters (logs were in {})",
        dir.path().display()
    );
    for s in [&mut ledger_a, &mut ledger_b, &mut audit] {
        s.kill();
    }
    system.shutdown().await
}

fn describe(outcome: &Result<(), Failed>) -> String {
    match outcome {
        Ok(()) => "COMMITTED".into(),
        Err(e) => format!("ABORTED everywhere: {e}"),
    }
}
