//! Waiting for recovery to settle, and the invariants checked after it.
//!
//! Settled: no prepared transaction in any database, and the coordinator lists no transaction
//! as active, preparing, committing or aborting. Then, over the whole history so far:
//! 1. money is conserved, in total and per database against that database's ledger;
//! 2. atomicity: a transaction's ledger rows are in both of its databases or in neither, and no
//!    ledger row belongs to a transaction no client began;
//! 3. durability: a transaction a client saw commit is in both, one it saw abort in neither;
//! 4. nothing is left hanging (the settle condition);
//! 5. the coordinator agrees: GetTransaction says COMMITTED for one that is in the databases,
//!    and ABORTED or NOT_FOUND (presumed abort) for one that is not.

use crate::system::{DATABASES, Deployment, System};
use crate::workload::{
    ACCOUNTS, Clients, INITIAL_BALANCE, OPENING_MEMO, Seen, TxnRecord, bounded, request,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};
use twopc::proto::{self, TxnState};

/// One broken invariant.
#[derive(Clone, Debug)]
pub struct Violation {
    pub kind: &'static str,
    /// The transaction, when it is about one.
    pub txn: Option<String>,
    pub detail: String,
}

impl Violation {
    fn new(kind: &'static str, txn: Option<&str>, detail: String) -> Self {
        Violation {
            kind,
            txn: txn.map(str::to_string),
            detail,
        }
    }

    /// Identifies a violation across check rounds, so each is reported once: by transaction
    /// when it is about one, else by what it says.
    pub fn key(&self) -> String {
        match &self.txn {
            Some(t) => format!("{} {t}", self.kind),
            None => format!("{} {}", self.kind, self.detail),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.txn {
            Some(t) => write!(f, "[{}] txn {t}: {}", self.kind, self.detail),
            None => write!(f, "[{}] {}", self.kind, self.detail),
        }
    }
}

const IN_FLIGHT: [TxnState; 4] = [
    TxnState::Active,
    TxnState::Preparing,
    TxnState::Committing,
    TxnState::Aborting,
];

/// Everything that is not settled yet, one line each; empty when settled.
async fn unsettled(sys: &System, clients: &Clients) -> Vec<String> {
    let mut left = Vec::new();
    for (i, pg) in sys.pgs.iter().enumerate() {
        let rows = async {
            let client = pg.client().await?;
            let rows = client
                .query(
                    "SELECT gid, (now() - prepared)::text FROM pg_prepared_xacts ORDER BY prepared",
                    &[],
                )
                .await?;
            Ok::<_, anyhow::Error>(rows)
        };
        match tokio::time::timeout(Duration::from_secs(10), rows).await {
            Ok(Ok(rows)) => {
                for r in rows {
                    left.push(format!(
                        "db{}: prepared {} (for {})",
                        i + 1,
                        r.get::<_, String>(0),
                        r.get::<_, String>(1)
                    ));
                }
            }
            Ok(Err(e)) => left.push(format!(
                "db{}: cannot query pg_prepared_xacts: {e:#}",
                i + 1
            )),
            Err(_) => left.push(format!("db{}: pg_prepared_xacts query timed out", i + 1)),
        }
    }
    let listed = bounded(clients.coordinator.clone().list_transactions(request(
        proto::ListTransactionsRequest {
            states: IN_FLIGHT.iter().map(|s| *s as i32).collect(),
            limit: 1000,
        },
    )))
    .await;
    match listed {
        Ok(list) => {
            for t in list.transactions {
                let branches: Vec<String> = t
                    .branches
                    .iter()
                    .map(|b| format!("{}:{:?}", b.participant_id, b.state()))
                    .collect();
                left.push(format!(
                    "coordinator: {} is {:?} (branches {})",
                    t.txn_id,
                    t.state(),
                    branches.join(", ")
                ));
            }
        }
        Err(s) => left.push(format!(
            "coordinator: ListTransactions failed: {:?}: {}",
            s.code(),
            s.message()
        )),
    }
    left
}

/// Waits until settled, at most `limit`. Ok(how long it took), or Err(what is left).
pub async fn settle(
    sys: &System,
    clients: &Clients,
    limit: Duration,
) -> Result<Duration, Vec<String>> {
    let start = Instant::now();
    loop {
        let left = unsettled(sys, clients).await;
        if left.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= limit {
            return Err(left);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What one database holds.
struct DbState {
    balance: i64,
    /// txn id → (rows, sum of deltas).
    ledger: HashMap<String, (i64, i64)>,
    ledger_sum: i64,
    poison: i64,
}

async fn read_db(sys: &System, i: usize) -> anyhow::Result<DbState> {
    let client = sys.pgs[i].client().await?;
    // The workload's tables, or the ledger service's (its entries' memo is the txn id).
    let (balance_sql, ledger_sql) = match sys.deployment {
        Deployment::Standalone => (
            "SELECT coalesce(sum(bal), 0)::int8 FROM acct",
            "SELECT txn_id, count(*)::int8, sum(delta)::int8 FROM ledger GROUP BY txn_id",
        ),
        Deployment::Embedded => (
            "SELECT coalesce(sum(balance), 0)::int8 FROM balances",
            "SELECT memo, count(*)::int8, sum(amount)::int8 FROM entries WHERE memo <> $1 GROUP BY memo",
        ),
    };
    let balance: i64 = client.query_one(balance_sql, &[]).await?.get(0);
    let rows = match sys.deployment {
        Deployment::Standalone => client.query(ledger_sql, &[]).await?,
        Deployment::Embedded => client.query(ledger_sql, &[&OPENING_MEMO]).await?,
    };
    let mut ledger = HashMap::new();
    let mut ledger_sum = 0;
    for r in rows {
        let sum: i64 = r.get(2);
        ledger_sum += sum;
        ledger.insert(r.get::<_, String>(0), (r.get::<_, i64>(1), sum));
    }
    let poison: i64 = client
        .query_one("SELECT count(*)::int8 FROM poison", &[])
        .await?
        .get(0);
    Ok(DbState {
        balance,
        ledger,
        ledger_sum,
        poison,
    })
}

/// What GetTransaction said about a transaction.
#[derive(Debug, Clone)]
enum Told {
    State(TxnState, String),
    NotFound,
    Error(String),
}

async fn get_transaction(clients: &Clients, id: &str) -> Told {
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let r = bounded(
            clients
                .coordinator
                .clone()
                .get_transaction(request(proto::GetTransactionRequest { txn_id: id.into() })),
        )
        .await;
        match r {
            Ok(t) => {
                let branches: Vec<String> = t
                    .branches
                    .iter()
                    .map(|b| format!("{}:{:?}", b.participant_id, b.state()))
                    .collect();
                let detail = format!(
                    "outcome {:?}, branches [{}], reason {:?}",
                    t.outcome(),
                    branches.join(", "),
                    t.reason
                );
                return Told::State(t.state(), detail);
            }
            Err(s) if s.code() == tonic::Code::NotFound => return Told::NotFound,
            Err(s) => last = format!("{:?}: {}", s.code(), s.message()),
        }
    }
    Told::Error(last)
}

fn db_list(dbs: &[usize]) -> String {
    let names: Vec<String> = dbs.iter().map(|d| format!("db{}", d + 1)).collect();
    format!("[{}]", names.join(","))
}

/// Checks every invariant over the whole history. Call it settled, with the workload stopped.
pub async fn check(sys: &System, clients: &Clients, txns: &[TxnRecord]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let dbs = match read_all(sys).await {
        Ok(dbs) => dbs,
        Err(v) => return vec![v],
    };
    money(&dbs, &mut violations);
    unknown_txns(&dbs, txns, &mut violations);
    let told: HashMap<String, Told> = futures::stream::iter(txns)
        .map(|t| async move { (t.id.clone(), get_transaction(clients, &t.id).await) })
        .buffer_unordered(16)
        .collect()
        .await;
    for t in txns {
        let seen = Presence::of(t, &dbs);
        atomicity(t, &seen, &dbs, &mut violations);
        durability(t, &seen, &mut violations);
        coordinator_agrees(t, &seen, told.get(&t.id), &mut violations);
    }
    violations
}

/// Every database's state, or the violation that it could not be read.
async fn read_all(sys: &System) -> Result<Vec<DbState>, Violation> {
    let mut dbs = Vec::new();
    for i in 0..DATABASES {
        let read = tokio::time::timeout(Duration::from_secs(30), read_db(sys, i)).await;
        match read.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after 30 s"))) {
            Ok(s) => dbs.push(s),
            Err(e) => {
                return Err(Violation::new(
                    "check",
                    None,
                    format!("cannot read db{}: {e:#}", i + 1),
                ));
            }
        }
    }
    Ok(dbs)
}

/// 1. Money: conserved overall, each database's balances match its ledger, no poison row.
fn money(dbs: &[DbState], violations: &mut Vec<Violation>) {
    let initial = ACCOUNTS * INITIAL_BALANCE;
    let total: i64 = dbs.iter().map(|d| d.balance).sum();
    if total != DATABASES as i64 * initial {
        let per: Vec<String> = dbs
            .iter()
            .enumerate()
            .map(|(i, d)| format!("db{}={}", i + 1, d.balance))
            .collect();
        violations.push(Violation::new(
            "money",
            None,
            format!(
                "sum(bal) over all databases is {total}, expected {} ({})",
                DATABASES as i64 * initial,
                per.join(" ")
            ),
        ));
    }
    for (i, d) in dbs.iter().enumerate() {
        // Every committed branch changes bal and writes its ledger row by the same amount.
        if d.balance - initial != d.ledger_sum {
            violations.push(Violation::new(
                "money",
                None,
                format!(
                    "db{}: sum(bal) moved by {} but its ledger rows add up to {}: some branch committed only part of its statements",
                    i + 1,
                    d.balance - initial,
                    d.ledger_sum
                ),
            ));
        }
        if d.poison != 0 {
            violations.push(Violation::new(
                "atomicity",
                None,
                format!(
                    "db{}: {} poison rows committed although each breaks a foreign key",
                    i + 1,
                    d.poison
                ),
            ));
        }
    }
}

/// 2. No ledger rows for a transaction no client began.
fn unknown_txns(dbs: &[DbState], txns: &[TxnRecord], violations: &mut Vec<Violation>) {
    let known: HashMap<&str, &TxnRecord> = txns.iter().map(|t| (t.id.as_str(), t)).collect();
    for (i, d) in dbs.iter().enumerate() {
        for (id, (rows, sum)) in &d.ledger {
            if !known.contains_key(id.as_str()) {
                violations.push(Violation::new(
                    "atomicity",
                    Some(id),
                    format!(
                        "db{} has {rows} ledger row(s) (sum {sum}) for a txn id no client began",
                        i + 1
                    ),
                ));
            }
        }
    }
}

/// Where one transaction's ledger rows are, and how to describe it in a violation.
struct Presence {
    /// The databases holding its ledger rows.
    present: Vec<usize>,
    /// Rows in both of its databases.
    both: bool,
    what: String,
}

impl Presence {
    fn of(t: &TxnRecord, dbs: &[DbState]) -> Presence {
        let present: Vec<usize> = (0..DATABASES)
            .filter(|&i| dbs[i].ledger.contains_key(&t.id))
            .collect();
        let what = format!(
            "dbs {} amount {}{}, client saw {:?} ({}), ledger rows in {}",
            db_list(&t.dbs),
            t.amount,
            if t.poison { " +poison" } else { "" },
            t.seen,
            t.note,
            db_list(&present)
        );
        let both = t.expect.iter().all(|(d, _, _)| present.contains(d));
        Presence {
            present,
            both,
            what,
        }
    }
}

/// 2. Atomicity: in both of its databases or in neither, one row of the right amount each.
fn atomicity(t: &TxnRecord, seen: &Presence, dbs: &[DbState], violations: &mut Vec<Violation>) {
    let (present, both, what) = (&seen.present, seen.both, &seen.what);
    let stray = present
        .iter()
        .any(|d| !t.expect.iter().any(|(e, _, _)| e == d));
    if stray {
        violations.push(Violation::new(
            "atomicity",
            Some(&t.id),
            format!("ledger row in a database it never touched: {what}"),
        ));
    }
    if !present.is_empty() && !both {
        violations.push(Violation::new(
            "atomicity",
            Some(&t.id),
            format!("in one database only: {what}"),
        ));
    }
    for &(db, want_rows, want_sum) in &t.expect {
        if let Some(&(rows, sum)) = dbs[db].ledger.get(&t.id)
            && (rows, sum) != (want_rows, want_sum)
        {
            violations.push(Violation::new(
                "atomicity",
                Some(&t.id),
                format!(
                    "db{} has {rows} ledger row(s) adding up to {sum}, expected {want_rows} adding up to {want_sum}: {what}",
                    db + 1
                ),
            ));
        }
    }
}

/// 3. Durability: what a client was told is what the databases hold.
fn durability(t: &TxnRecord, seen: &Presence, violations: &mut Vec<Violation>) {
    let (present, both, what) = (&seen.present, seen.both, &seen.what);
    match t.seen {
        Seen::Committed if !both => violations.push(Violation::new(
            "durability",
            Some(&t.id),
            format!("committed but not in both databases: {what}"),
        )),
        Seen::Aborted if !present.is_empty() => violations.push(Violation::new(
            "durability",
            Some(&t.id),
            format!("aborted but present: {what}"),
        )),
        _ => {}
    }
}

/// 5. The coordinator's word (GetTransaction) agrees with the databases.
fn coordinator_agrees(
    t: &TxnRecord,
    seen: &Presence,
    told: Option<&Told>,
    violations: &mut Vec<Violation>,
) {
    let (present, what) = (&seen.present, &seen.what);
    // 5. The coordinator's word.
    let told = told.cloned().unwrap_or(Told::Error("not asked".into()));
    let agrees = matches!(
        (&told, present.is_empty()),
        (Told::State(TxnState::Committed, _), false)
            | (Told::State(TxnState::Aborted, _), true)
            | (Told::NotFound, true)
    );
    if !agrees {
        let said = match &told {
            Told::State(s, detail) => format!("{s:?} ({detail})"),
            Told::NotFound => "NOT_FOUND".into(),
            Told::Error(e) => format!("error {e}"),
        };
        violations.push(Violation::new(
            "coordinator",
            Some(&t.id),
            format!("GetTransaction says {said}, but {what}"),
        ));
    }
}
