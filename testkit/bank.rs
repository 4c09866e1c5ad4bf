//! The bank every scenario, the crash harness and the demo share: accounts in each database, a
//! ledger row per branch carrying its txn id, and the invariants that must hold after any
//! history of transfers, crashes included:
//! 1. money is conserved, in total and per database against that database's ledger;
//! 2. atomicity: a transaction's ledger rows are in all of its databases or in none, and no
//!    ledger row belongs to a transaction no client began;
//! 3. durability: a transaction a client saw commit is in its databases, one it saw abort in
//!    none;
//! 4. nothing is left prepared;
//! 5. the coordinator agrees: GetTransaction says COMMITTED for one that is in the databases,
//!    and ABORTED or NOT_FOUND (presumed abort) for one that is not.
//!
//! A scenario moves money with [`transfer`] and ends with [`check`]; the crash harness records
//! its own transfers as [`Transfer`]s and calls [`check_states`] on what it read.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use super::PgCluster;
use super::system::System;
use super::wait;
use crate::proto::{self, TxnState};

/// Accounts per database.
pub const ACCOUNTS: i64 = 20;
/// Each account's balance before the first transfer.
pub const INITIAL_BALANCE: i64 = 1000;

/// The bank's tables, run on every database: accounts `1..=ACCOUNTS` with `INITIAL_BALANCE`
/// each, and the ledger (a row per branch, carrying the txn id), and a table whose deferred
/// foreign key makes a branch fail at PREPARE (a `poison` row never commits).
pub const SCHEMA: &str = "
    CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
    INSERT INTO acct SELECT g, 1000 FROM generate_series(1, 20) AS g;
    CREATE TABLE ledger (txn_id text NOT NULL, delta bigint NOT NULL);
    CREATE TABLE poison (ref int REFERENCES acct (id) DEFERRABLE INITIALLY DEFERRED);
";

/// Where a bank's balances and ledger are read from: [`Tables::STANDARD`] for [`SCHEMA`], or a
/// service's own tables (the `ledger` example's, in the crash harness's embedded runs).
#[derive(Clone, Copy, Debug)]
pub struct Tables {
    /// One row, one int8 column: the sum of the balances.
    pub balance: &'static str,
    /// Rows of (txn id, int8 row count, int8 sum of amounts): the ledger by transaction.
    pub ledger: &'static str,
}

impl Tables {
    pub const STANDARD: Tables = Tables {
        balance: "SELECT coalesce(sum(bal), 0)::int8 FROM acct",
        ledger: "SELECT txn_id, count(*)::int8, sum(delta)::int8 FROM ledger GROUP BY txn_id",
    };
}

/// What a client was told about a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Begun; Commit or Abort not answered yet.
    InFlight,
    Committed,
    Aborted,
    /// Commit or Abort failed (RPC error), or answered something other than an outcome.
    Unknown,
}

/// One transfer a client began, and what it was told.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub id: String,
    /// Debited database a, credited database b.
    pub dbs: [usize; 2],
    pub amount: i64,
    /// It also wrote a poison row, so it must not commit.
    pub poison: bool,
    /// What a commit leaves behind, per database: (database, ledger rows, their sum).
    pub expect: Vec<(usize, i64, i64)>,
    pub seen: Seen,
    /// The scenario (or soak round) it began in.
    pub round: usize,
    /// What happened on the client side: the failed step, the abort reason, the RPC error.
    pub note: String,
}

/// One broken invariant.
#[derive(Clone, Debug)]
pub struct Violation {
    pub kind: &'static str,
    /// The transaction, when it is about one.
    pub txn: Option<String>,
    pub detail: String,
}

impl Violation {
    pub fn new(kind: &'static str, txn: Option<&str>, detail: String) -> Self {
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

/// What one database holds.
pub struct DbState {
    /// The sum of the balances.
    pub balance: i64,
    /// txn id → (rows, sum of deltas).
    pub ledger: HashMap<String, (i64, i64)>,
    /// The sum of every ledger row.
    pub ledger_sum: i64,
    /// Poison rows committed (each breaks a foreign key, so there must be none).
    pub poison: i64,
}

/// What GetTransaction said about a transaction.
#[derive(Debug, Clone)]
pub enum Told {
    State(TxnState, String),
    NotFound,
    Error(String),
}

impl Told {
    /// What a GetTransaction answer says.
    pub fn of(t: &proto::Transaction) -> Told {
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
        Told::State(t.state(), detail)
    }
}

/// Reads what database `pg` holds, through `tables`.
pub async fn read(pg: &PgCluster, tables: Tables) -> Result<DbState> {
    let client = pg.client().await?;
    let balance: i64 = client
        .query_one(tables.balance, &[])
        .await
        .context("reading the balances")?
        .get(0);
    let rows = client
        .query(tables.ledger, &[])
        .await
        .context("reading the ledger")?;
    let mut ledger = HashMap::new();
    let mut ledger_sum = 0;
    for r in rows {
        let sum: i64 = r.get(2);
        ledger_sum += sum;
        ledger.insert(r.get::<_, String>(0), (r.get::<_, i64>(1), sum));
    }
    // A service's own tables may have no poison table: then nothing was poisoned.
    let poison = match client
        .query_opt("SELECT to_regclass('poison') IS NOT NULL", &[])
        .await?
    {
        Some(r) if r.get::<_, bool>(0) => client
            .query_one("SELECT count(*)::int8 FROM poison", &[])
            .await?
            .get(0),
        _ => 0,
    };
    Ok(DbState {
        balance,
        ledger,
        ledger_sum,
        poison,
    })
}

/// Every database's state, read with a bound, or the violation that one could not be read.
pub async fn read_all(
    pgs: &[impl AsRef<PgCluster>],
    tables: Tables,
) -> Result<Vec<DbState>, Violation> {
    let mut dbs = Vec::new();
    for (i, pg) in pgs.iter().enumerate() {
        let state = tokio::time::timeout(Duration::from_secs(30), read(pg.as_ref(), tables)).await;
        match state.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after 30 s"))) {
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

/// Invariants 1, 2, 3 and 5 over what the databases hold (`dbs`, each opened with
/// `initial` in total), every transfer clients began, and what the coordinator said of each
/// (`told`; one missing counts as not asked).
pub fn check_states(
    dbs: &[DbState],
    initial: i64,
    transfers: &[Transfer],
    told: &HashMap<String, Told>,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    money(dbs, initial, &mut violations);
    unknown_txns(dbs, transfers, &mut violations);
    for t in transfers {
        let seen = Presence::of(t, dbs);
        atomicity(t, &seen, dbs, &mut violations);
        durability(t, &seen, &mut violations);
        coordinator_agrees(t, &seen, told.get(&t.id), &mut violations);
    }
    violations
}

/// Every invariant over `sys` after `transfers` (made with [`transfer`]): reads the databases,
/// asks the coordinator about each transfer, and waits (bounded) for nothing to be prepared.
pub async fn check(sys: &System, transfers: &[Transfer]) -> Vec<Violation> {
    let dbs = match read_all(&sys.pgs, Tables::STANDARD).await {
        Ok(dbs) => dbs,
        Err(v) => return vec![v],
    };
    let mut told = HashMap::new();
    for t in transfers {
        told.insert(t.id.clone(), ask(sys, &t.id).await);
    }
    let mut violations = check_states(&dbs, ACCOUNTS * INITIAL_BALANCE, transfers, &told);
    for (i, pg) in sys.pgs.iter().enumerate() {
        let none = || async { pg.prepared().await.is_ok_and(|n| n == 0) };
        if !wait::holds_within(Duration::from_secs(10), none).await {
            let left = pg.prepared().await.unwrap_or(-1);
            violations.push(Violation::new(
                "settled",
                None,
                format!("db{}: {left} transactions still prepared after 10 s", i + 1),
            ));
        }
    }
    violations
}

/// What the coordinator says of `id` now.
async fn ask(sys: &System, id: &str) -> Told {
    let asked = sys
        .coordinator()
        .await
        .get_transaction(proto::GetTransactionRequest { txn_id: id.into() })
        .await;
    match asked {
        Ok(t) => Told::of(&t.into_inner()),
        Err(s) if s.code() == tonic::Code::NotFound => Told::NotFound,
        Err(s) => Told::Error(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// Moves `amount` from account `from.1` in database `from.0` to account `to.1` in database
/// `to.0`, writing a ledger row in each, through the system's participants: commits, or aborts
/// when a statement fails. What it was told is in the returned [`Transfer`].
pub async fn transfer(sys: &System, from: (usize, i64), to: (usize, i64), amount: i64) -> Transfer {
    let id = sys.begin().await;
    let value = proto::Value::int;
    let statements = [
        (
            from.0,
            "UPDATE acct SET bal = bal - $1 WHERE id = $2",
            vec![value(amount), value(from.1)],
        ),
        (
            to.0,
            "UPDATE acct SET bal = bal + $1 WHERE id = $2",
            vec![value(amount), value(to.1)],
        ),
        (
            from.0,
            "INSERT INTO ledger VALUES ($1, $2)",
            vec![proto::Value::text(&id), value(-amount)],
        ),
        (
            to.0,
            "INSERT INTO ledger VALUES ($1, $2)",
            vec![proto::Value::text(&id), value(amount)],
        ),
    ];
    let mut failed = None;
    for (db, sql, params) in statements {
        if let Err(s) = sys.exec(db, &id, sql, params).await {
            failed = Some(format!("{sql} on db{}: {}", db + 1, s.message()));
            break;
        }
    }
    let (seen, note) = match failed {
        None => match proto::Outcome::try_from(sys.commit(&id).await.outcome) {
            Ok(proto::Outcome::Committed) => (Seen::Committed, String::new()),
            Ok(proto::Outcome::Aborted) => (Seen::Aborted, "commit answered ABORTED".into()),
            other => (Seen::Unknown, format!("commit answered {other:?}")),
        },
        Some(step) => {
            sys.abort(&id).await;
            (Seen::Aborted, step)
        }
    };
    let expect = if from.0 == to.0 {
        vec![(from.0, 2, 0)]
    } else {
        vec![(from.0, 1, -amount), (to.0, 1, amount)]
    };
    Transfer {
        id,
        dbs: [from.0, to.0],
        amount,
        poison: false,
        expect,
        seen,
        round: 0,
        note,
    }
}

fn db_list(dbs: &[usize]) -> String {
    let names: Vec<String> = dbs.iter().map(|d| format!("db{}", d + 1)).collect();
    format!("[{}]", names.join(","))
}

/// 1. Money: conserved overall, each database's balances match its ledger, no poison row.
fn money(dbs: &[DbState], initial: i64, violations: &mut Vec<Violation>) {
    let databases = dbs.len() as i64;
    let total: i64 = dbs.iter().map(|d| d.balance).sum();
    if total != databases * initial {
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
                databases * initial,
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
fn unknown_txns(dbs: &[DbState], txns: &[Transfer], violations: &mut Vec<Violation>) {
    let known: HashMap<&str, &Transfer> = txns.iter().map(|t| (t.id.as_str(), t)).collect();
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
    fn of(t: &Transfer, dbs: &[DbState]) -> Presence {
        let present: Vec<usize> = (0..dbs.len())
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
fn atomicity(t: &Transfer, seen: &Presence, dbs: &[DbState], violations: &mut Vec<Violation>) {
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
fn durability(t: &Transfer, seen: &Presence, violations: &mut Vec<Violation>) {
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
    t: &Transfer,
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
