//! `twopcctl`: the operator's view of a twopc coordinator and its participants, over gRPC.
//!
//! Human tables by default, `--json` for scripts. Resolving a stuck transaction by hand is
//! always explicit (`--force-commit` / `--force-abort`) and leaves an audit line in the server's
//! log with the operator's name.

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde_json::{Value as Json, json};
use std::sync::OnceLock;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use twopc::process::auth::{self, Bearer};
use twopc::process::clock::now_ms;
use twopc::process::leader_channel::LeaderChannel;
use twopc::process::tls::{self, Tls};
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
use twopc::proto::{self, SagaState, TxnState};

/// Operate a twopc coordinator and its participants.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// The coordinator's URL; a replicated coordinator's URLs, separated by commas (calls go
    /// to the leader).
    #[arg(
        long,
        env = "TWOPC_COORDINATOR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    coordinator: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// https:// servers: the CA they chain to, and this operator's client certificate.
    #[command(flatten)]
    tls: tls::Options,
    /// File holding the operator's bearer token, for servers with --auth-tokens.
    #[arg(long, env = "TWOPC_TOKEN_FILE", global = true)]
    token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Transactions, newest first, with their age.
    List {
        /// Only these states (repeatable).
        #[arg(long = "state", value_parser = parse_state)]
        states: Vec<TxnState>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One transaction and its branches.
    Show { txn_id: String },
    /// Abort an active transaction.
    Abort {
        txn_id: String,
        #[arg(long, default_value = "aborted by an operator")]
        reason: String,
    },
    /// Branches prepared in a participant's database (in doubt while nobody resolves them).
    InDoubt {
        /// The participant's URL.
        #[arg(long)]
        participant: String,
    },
    /// Who waits for whom: the global wait-for graph of the live transactions' statements
    /// blocked on locks, asked of their participants now. A cycle across databases is a
    /// distributed deadlock, which the coordinator breaks within about a second.
    Locks {
        /// Only waits at least this long (ms).
        #[arg(long, default_value_t = 0)]
        min_wait_ms: u32,
    },
    /// The participants the coordinator has enlisted: endpoint, process instance, when last
    /// heard from, health (checked by the coordinator) and branches in live transactions.
    Participants,
    /// Resolve a stuck transaction by hand. At the coordinator (default): declare the branches
    /// still owed phase 2 finished (their participant is gone for good); it never reverses a
    /// decision. With --participant: commit or roll back that participant's prepared branch
    /// directly, for when its coordinator is gone (a heuristic decision: be sure).
    Resolve(Resolve),
    /// Sagas, newest first: state, steps done, age, and why one compensates or is stuck.
    Sagas {
        /// Only these states (repeatable): running, completed, compensating, compensated, stuck.
        #[arg(long = "state", value_parser = parse_saga_state)]
        states: Vec<SagaState>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One saga and its steps; with --retry, --skip or --compensate, an operator's decision
    /// on a stuck one (audited).
    Saga(SagaArgs),
}

#[derive(ClapArgs, Debug)]
struct SagaArgs {
    saga_id: String,
    /// Send the stuck step again, its attempts counted afresh.
    #[arg(long, conflicts_with_all = ["skip", "compensate"])]
    retry: bool,
    /// Count the stuck step as done: its action as succeeded, or its compensation as applied
    /// (you made sure of it by hand).
    #[arg(long, conflicts_with = "compensate")]
    skip: bool,
    /// Compensate a saga stopped under ON_EXHAUSTED_STOP after all.
    #[arg(long)]
    compensate: bool,
    /// Who is doing this, for the audit line [default: $USER].
    #[arg(long)]
    operator: Option<String>,
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(ClapArgs, Debug)]
struct Resolve {
    txn_id: String,
    /// Declare it committed.
    #[arg(
        long,
        conflicts_with = "force_abort",
        required_unless_present = "force_abort"
    )]
    force_commit: bool,
    /// Declare it aborted.
    #[arg(long)]
    force_abort: bool,
    /// Resolve the branch prepared at this participant instead of at the coordinator.
    #[arg(long)]
    participant: Option<String>,
    /// Who is doing this, for the audit line [default: $USER].
    #[arg(long)]
    operator: Option<String>,
    #[arg(long, default_value = "")]
    reason: String,
}

/// `committing` → TXN_STATE_COMMITTING.
fn parse_state(s: &str) -> Result<TxnState, String> {
    TxnState::from_str_name(&format!("TXN_STATE_{}", s.to_uppercase()))
        .filter(|s| *s != TxnState::Unspecified)
        .ok_or_else(|| format!("unknown state {s:?}: one of active, preparing, committing, committed, aborting, aborted"))
}

/// `stuck` → SAGA_STATE_STUCK.
fn parse_saga_state(s: &str) -> Result<SagaState, String> {
    SagaState::from_str_name(&format!("SAGA_STATE_{}", s.to_uppercase()))
        .filter(|s| *s != SagaState::Unspecified)
        .ok_or_else(|| {
            format!("unknown saga state {s:?}: one of running, completed, compensating, compensated, stuck")
        })
}

fn saga_json(s: &proto::Saga) -> Json {
    json!({
        "saga_id": s.saga_id,
        "state": short(s.state().as_str_name(), "SAGA_STATE_"),
        "reason": s.reason,
        "age_ms": now_ms() - s.created_unix_ms,
        "created_unix_ms": s.created_unix_ms,
        "finished_unix_ms": s.finished_unix_ms,
        "steps": s.steps.iter().map(|st| json!({
            "name": st.name,
            "state": short(st.state().as_str_name(), "SAGA_STEP_STATE_"),
            "attempts": st.attempts,
            "compensations": st.compensations,
            "last_error": st.last_error,
            "output": st.output.as_ref().map(|o| o.rows.len()),
        })).collect::<Vec<_>>(),
    })
}

fn print_saga(s: &proto::Saga) {
    println!("saga {}", s.saga_id);
    println!(
        "  state    {}",
        short(s.state().as_str_name(), "SAGA_STATE_")
    );
    println!("  age      {}", age(s.created_unix_ms));
    if !s.reason.is_empty() {
        println!("  reason   {}", s.reason);
    }
    let mut steps = table(&["step", "state", "attempts", "compensations", "last error"]);
    for st in &s.steps {
        steps.add_row(vec![
            st.name.clone(),
            short(st.state().as_str_name(), "SAGA_STEP_STATE_"),
            st.attempts.to_string(),
            st.compensations.to_string(),
            st.last_error.clone(),
        ]);
    }
    println!("{steps}");
}

/// Loaded once from the flags, for every server this run dials.
static TLS: OnceLock<(Tls, Bearer)> = OnceLock::new();

fn channel(url: &str) -> Result<InterceptedService<Channel, Bearer>> {
    let (tls, bearer) = TLS.get_or_init(Default::default);
    let channel = tls
        .endpoint(url)
        .with_context(|| format!("cannot dial {url:?}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .connect_lazy();
    Ok(InterceptedService::new(channel, bearer.clone()))
}

/// "3.2s", "4m10s", "2h5m": how long ago.
fn age(since_ms: i64) -> String {
    let s = ((now_ms() - since_ms).max(0) as f64) / 1000.0;
    match s {
        s if s < 60.0 => format!("{s:.1}s"),
        s if s < 3600.0 => format!("{}m{}s", (s / 60.0) as u64, (s % 60.0) as u64),
        s => format!("{}h{}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64),
    }
}

fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_lowercase()
}

fn txn_json(t: &proto::Transaction) -> Json {
    json!({
        "txn_id": t.txn_id,
        "state": short(t.state().as_str_name(), "TXN_STATE_"),
        "outcome": short(t.outcome().as_str_name(), "OUTCOME_"),
        "label": t.label,
        "reason": t.reason,
        "age_ms": now_ms() - t.created_unix_ms,
        "created_unix_ms": t.created_unix_ms,
        "deadline_unix_ms": t.deadline_unix_ms,
        "decided_unix_ms": t.decided_unix_ms,
        "finished_unix_ms": t.finished_unix_ms,
        "branches": t.branches.iter().map(|b| json!({
            "participant_id": b.participant_id,
            "endpoint": b.endpoint,
            "state": short(b.state().as_str_name(), "BRANCH_STATE_"),
            "xid": b.xid,
        })).collect::<Vec<_>>(),
    })
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

fn print_txn(t: &proto::Transaction) {
    println!("transaction {}", t.txn_id);
    println!(
        "  state    {}",
        short(t.state().as_str_name(), "TXN_STATE_")
    );
    println!(
        "  outcome  {}",
        short(t.outcome().as_str_name(), "OUTCOME_")
    );
    println!("  age      {}", age(t.created_unix_ms));
    if !t.label.is_empty() {
        println!("  label    {}", t.label);
    }
    if !t.reason.is_empty() {
        println!("  reason   {}", t.reason);
    }
    let mut branches = table(&["participant", "endpoint", "branch state", "xid"]);
    for b in &t.branches {
        branches.add_row(vec![
            b.participant_id.clone(),
            b.endpoint.clone(),
            short(b.state().as_str_name(), "BRANCH_STATE_"),
            b.xid.to_string(),
        ]);
    }
    println!("{branches}");
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    let token = match &cli.token_file {
        Some(path) => Some(auth::read_peer_token(path)?),
        None => None,
    };
    let _ = TLS.set((Tls::load(&cli.tls)?, Bearer::new(token.as_deref())));
    match cli.command {
        Command::List { states, limit } => list(&cli.coordinator, &states, limit, json).await,
        Command::Show { txn_id } => show(&cli.coordinator, txn_id, json).await,
        Command::Abort { txn_id, reason } => abort(&cli.coordinator, txn_id, reason, json).await,
        Command::InDoubt { participant } => in_doubt(&participant, json).await,
        Command::Locks { min_wait_ms } => locks(&cli.coordinator, min_wait_ms, json).await,
        Command::Participants => participants(&cli.coordinator, json).await,
        Command::Resolve(r) => resolve(&cli.coordinator, r, json).await,
        Command::Sagas { states, limit } => sagas(&cli.coordinator, &states, limit, json).await,
        Command::Saga(s) => saga(&cli.coordinator, s, json).await,
    }
}

/// The coordinator, or its replicas (URLs separated by commas): calls go to the leader.
fn coordinator(urls: &str) -> Result<CoordinatorClient<InterceptedService<LeaderChannel, Bearer>>> {
    let (tls, bearer) = TLS.get_or_init(Default::default);
    let channel = LeaderChannel::new(urls, tls).with_context(|| format!("cannot dial {urls:?}"))?;
    Ok(CoordinatorClient::new(InterceptedService::new(
        channel,
        bearer.clone(),
    )))
}

/// `list`: transactions, newest first.
async fn list(url: &str, states: &[TxnState], limit: u32, json: bool) -> Result<()> {
    let resp = coordinator(url)?
        .list_transactions(proto::ListTransactionsRequest {
            states: states.iter().map(|s| *s as i32).collect(),
            limit,
        })
        .await?
        .into_inner();
    if json {
        println!(
            "{}",
            Json::Array(resp.transactions.iter().map(txn_json).collect())
        );
        return Ok(());
    }
    let mut t = table(&["txn id", "state", "outcome", "age", "branches", "label"]);
    for x in &resp.transactions {
        t.add_row(vec![
            x.txn_id.clone(),
            short(x.state().as_str_name(), "TXN_STATE_"),
            short(x.outcome().as_str_name(), "OUTCOME_"),
            age(x.created_unix_ms),
            x.branches
                .iter()
                .map(|b| b.participant_id.as_str())
                .collect::<Vec<_>>()
                .join(","),
            x.label.clone(),
        ]);
    }
    println!("{t}\n{} transaction(s)", resp.transactions.len());
    Ok(())
}

/// `show`: one transaction and its branches.
async fn show(url: &str, txn_id: String, json: bool) -> Result<()> {
    let t = coordinator(url)?
        .get_transaction(proto::GetTransactionRequest { txn_id })
        .await?
        .into_inner();
    if json {
        println!("{}", txn_json(&t));
    } else {
        print_txn(&t);
    }
    Ok(())
}

/// `abort`: ask the coordinator to abort.
async fn abort(url: &str, txn_id: String, reason: String, json: bool) -> Result<()> {
    let r = coordinator(url)?
        .abort(proto::AbortRequest {
            txn_id: txn_id.clone(),
            reason,
            ..Default::default()
        })
        .await?
        .into_inner();
    let outcome = short(r.outcome().as_str_name(), "OUTCOME_");
    if json {
        println!("{}", json!({"txn_id": txn_id, "outcome": outcome}));
    } else {
        println!("transaction {txn_id}: {outcome}");
    }
    Ok(())
}

/// `locks`: the global wait-for graph.
async fn locks(url: &str, min_wait_ms: u32, json: bool) -> Result<()> {
    let resp = coordinator(url)?
        .list_lock_waits(proto::ListLockWaitsRequest { min_wait_ms })
        .await?
        .into_inner();
    if json {
        let waits: Vec<Json> = resp
            .waits
            .iter()
            .map(|w| {
                json!({"participant_id": w.participant_id, "waiter_txn_id": w.waiter_txn_id,
                    "holder_txn_id": w.holder_txn_id, "holder": w.holder,
                    "waited_ms": w.waited_ms, "lock": w.lock})
            })
            .collect();
        println!(
            "{}",
            json!({"waits": waits, "unreachable": resp.unreachable})
        );
        return Ok(());
    }
    let mut t = table(&["waiter", "waits for", "on", "for", "lock"]);
    for w in &resp.waits {
        t.add_row(vec![
            w.waiter_txn_id.clone(),
            w.holder.clone(),
            w.participant_id.clone(),
            format!("{:.1}s", f64::from(w.waited_ms) / 1000.0),
            w.lock.clone(),
        ]);
    }
    println!(
        "{t}
{} wait(s)",
        resp.waits.len()
    );
    for u in &resp.unreachable {
        println!("not asked: {u}");
    }
    Ok(())
}

/// `participants`: the coordinator's registry.
async fn participants(url: &str, json: bool) -> Result<()> {
    let resp = coordinator(url)?
        .list_participants(proto::ListParticipantsRequest {})
        .await?
        .into_inner();
    let health =
        |p: &proto::ParticipantInfo| short(p.health().as_str_name(), "PARTICIPANT_HEALTH_");
    if json {
        let rows: Vec<Json> = resp
            .participants
            .iter()
            .map(|p| {
                json!({"participant_id": p.participant_id, "endpoint": p.endpoint,
                    "instance_id": p.instance_id, "last_seen_unix_ms": p.last_seen_unix_ms,
                    "health": health(p), "health_detail": p.health_detail,
                    "health_checked_unix_ms": p.health_checked_unix_ms,
                    "prepared_branches": p.prepared_branches, "open_branches": p.open_branches})
            })
            .collect();
        println!("{}", Json::Array(rows));
        return Ok(());
    }
    let mut t = table(&[
        "participant",
        "endpoint",
        "instance",
        "last seen",
        "health",
        "prepared",
        "open",
    ]);
    for p in &resp.participants {
        let mut h = health(p);
        if !p.health_detail.is_empty() {
            h = format!("{h}: {}", p.health_detail);
        }
        t.add_row(vec![
            p.participant_id.clone(),
            p.endpoint.clone(),
            // The first 8 hex digits tell restarts apart.
            p.instance_id.chars().take(8).collect(),
            match p.last_seen_unix_ms {
                0 => "not since start".into(),
                ms => format!("{} ago", age(ms)),
            },
            h,
            p.prepared_branches.to_string(),
            p.open_branches.to_string(),
        ]);
    }
    println!(
        "{t}
{} participant(s)",
        resp.participants.len()
    );
    Ok(())
}

/// `sagas`: sagas, newest first.
async fn sagas(url: &str, states: &[SagaState], limit: u32, json: bool) -> Result<()> {
    let resp = coordinator(url)?
        .list_sagas(proto::ListSagasRequest {
            states: states.iter().map(|s| *s as i32).collect(),
            limit,
        })
        .await?
        .into_inner();
    if json {
        println!(
            "{}",
            Json::Array(resp.sagas.iter().map(saga_json).collect())
        );
        return Ok(());
    }
    let mut t = table(&["saga id", "state", "steps done", "age", "reason"]);
    for s in &resp.sagas {
        let done = s
            .steps
            .iter()
            .filter(|st| st.state() == proto::SagaStepState::Succeeded)
            .count();
        t.add_row(vec![
            s.saga_id.clone(),
            short(s.state().as_str_name(), "SAGA_STATE_"),
            format!("{done}/{}", s.steps.len()),
            age(s.created_unix_ms),
            s.reason.clone(),
        ]);
    }
    println!("{t}\n{} saga(s)", resp.sagas.len());
    Ok(())
}

/// `saga`: one saga, or an operator's decision on a stuck one.
async fn saga(url: &str, a: SagaArgs, json: bool) -> Result<()> {
    let resolution = match (a.retry, a.skip, a.compensate) {
        (true, _, _) => Some(proto::SagaResolution::Retry),
        (_, true, _) => Some(proto::SagaResolution::Skip),
        (_, _, true) => Some(proto::SagaResolution::Compensate),
        _ => None,
    };
    let mut client = coordinator(url)?;
    let s = match resolution {
        None => client
            .get_saga(proto::GetSagaRequest {
                saga_id: a.saga_id,
                wait_ms: 0,
            })
            .await?
            .into_inner(),
        Some(r) => {
            let operator = a
                .operator
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "unknown".into());
            let s = client
                .resolve_saga(proto::ResolveSagaRequest {
                    saga_id: a.saga_id,
                    resolution: r as i32,
                    operator: operator.clone(),
                    reason: a.reason,
                })
                .await?
                .into_inner();
            if !json {
                println!(
                    "{} by {operator}:",
                    short(r.as_str_name(), "SAGA_RESOLUTION_")
                );
            }
            s
        }
    };
    if json {
        println!("{}", saga_json(&s));
    } else {
        print_saga(&s);
    }
    Ok(())
}

/// `in-doubt`: a participant's prepared branches.
async fn in_doubt(participant: &str, json: bool) -> Result<()> {
    let resp = ParticipantClient::new(channel(participant)?)
        .recover(proto::RecoverRequest::default())
        .await?
        .into_inner();
    if json {
        let rows: Vec<Json> = resp
            .branches
            .iter()
            .map(|b| json!({"txn_id": b.txn_id, "coordinator_id": b.coordinator_id, "gid": b.gid, "xid": b.xid, "age_ms": b.age_ms}))
            .collect();
        println!("{}", Json::Array(rows));
        return Ok(());
    }
    let mut t = table(&["txn id", "coordinator", "prepared for", "xid", "gid"]);
    for b in &resp.branches {
        t.add_row(vec![
            b.txn_id.clone(),
            b.coordinator_id.clone(),
            age(now_ms() - b.age_ms),
            b.xid.to_string(),
            b.gid.clone(),
        ]);
    }
    println!(
        "{t}\n{} prepared branch(es) at {participant}",
        resp.branches.len()
    );
    Ok(())
}

/// `resolve`: an operator finishes a transaction by hand, at the coordinator or at one
/// participant (a heuristic decision).
async fn resolve(url: &str, r: Resolve, json: bool) -> Result<()> {
    let operator = r
        .operator
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let verb = if r.force_commit {
        "committed"
    } else {
        "rolled back"
    };
    match &r.participant {
        Some(url) => {
            let mut client = ParticipantClient::new(channel(url)?);
            let prepared = client
                .recover(proto::RecoverRequest::default())
                .await?
                .into_inner();
            let Some(branch) = prepared.branches.iter().find(|b| b.txn_id == r.txn_id) else {
                bail!("{url} holds no prepared branch of transaction {}", r.txn_id);
            };
            let mut req = tonic::Request::new(proto::BranchRequest {
                txn_id: r.txn_id.clone(),
                xid: branch.xid,
                coordinator_id: branch.coordinator_id.clone(),
                ..Default::default()
            });
            req.metadata_mut().insert(
                "x-twopc-operator",
                operator.parse().context("operator name")?,
            );
            if !r.reason.is_empty() {
                req.metadata_mut()
                    .insert("x-twopc-reason", r.reason.parse().context("reason")?);
            }
            if r.force_commit {
                client.commit(req).await?;
            } else {
                client.rollback(req).await?;
            }
            if json {
                println!(
                    "{}",
                    json!({"txn_id": r.txn_id, "participant": url, "branch": verb, "gid": branch.gid})
                );
            } else {
                println!("branch {} at {url}: {verb} by {operator}", branch.gid);
            }
        }
        None => {
            let t = coordinator(url)?
                .resolve_transaction(proto::ResolveTransactionRequest {
                    txn_id: r.txn_id.clone(),
                    resolution: if r.force_commit {
                        proto::Resolution::ForceCommit
                    } else {
                        proto::Resolution::ForceAbort
                    } as i32,
                    operator: operator.clone(),
                    reason: r.reason.clone(),
                })
                .await?
                .into_inner();
            if json {
                println!("{}", txn_json(&t));
            } else {
                println!("resolved by {operator}:");
                print_txn(&t);
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A gRPC status reads best as its code and message.
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("twopcctl: {:?}: {}", s.code(), s.message()),
                None => eprintln!("twopcctl: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// Clap checks its flag definitions only when it parses: a clash would panic at start.
    #[test]
    fn the_flags_are_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
