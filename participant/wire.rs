//! The one place the participant meets the `twopc.v1` types: a request's statements and
//! parameters in, results, lock waits and prepared branches out. Below it, the branch table and
//! the database speak the participant's own types (`statement.rs`, `database.rs`).

use super::barrier::{Op, StepAnswer, StepCall};
use super::branches::BranchWait;
use super::database;
use super::error::Error;
use super::statement::{Datum, Rows, Statement};
use crate::proto::marker::MarkerSecret;
use crate::proto::{self, value::Kind};

/// A parameter from the wire; a value with no field set is the caller's error, `$n` named.
fn datum(n: usize, v: proto::Value) -> Result<Datum, String> {
    Ok(match v.kind {
        None => {
            return Err(format!(
                "parameter ${n} has no value: set one of its fields (null_value: true for NULL)"
            ));
        }
        Some(Kind::NullValue(_)) => Datum::Null,
        Some(Kind::BoolValue(b)) => Datum::Bool(b),
        Some(Kind::IntValue(i)) => Datum::Int(i),
        Some(Kind::DoubleValue(d)) => Datum::Double(d),
        Some(Kind::TextValue(s)) => Datum::Text(s),
        Some(Kind::BytesValue(b)) => Datum::Bytes(b),
    })
}

/// A cell for the wire.
pub fn value(d: Datum) -> proto::Value {
    let kind = match d {
        Datum::Null => Kind::NullValue(true),
        Datum::Bool(b) => Kind::BoolValue(b),
        Datum::Int(i) => Kind::IntValue(i),
        Datum::Double(d) => Kind::DoubleValue(d),
        Datum::Text(s) => Kind::TextValue(s),
        Datum::Bytes(b) => Kind::BytesValue(b),
    };
    proto::Value { kind: Some(kind) }
}

/// The statements of an Execute: `sql` with `params`, or `statements`. Every parameter is
/// checked here, before anything runs; in a batch, a message names the statement.
pub fn statements(req: &mut proto::ExecuteRequest) -> Result<Vec<Statement>, Error> {
    let batch = !req.statements.is_empty();
    if batch && (!req.sql.is_empty() || !req.params.is_empty()) {
        return Err(Error::InvalidArgument(
            "send either `sql` (with `params`) or `statements`, not both".into(),
        ));
    }
    let wire = match batch {
        true => std::mem::take(&mut req.statements),
        false => vec![proto::Statement {
            sql: std::mem::take(&mut req.sql),
            params: std::mem::take(&mut req.params),
        }],
    };
    checked(wire)
}

/// Statements from the wire, every parameter checked; with several, a message names the one.
fn checked(wire: Vec<proto::Statement>) -> Result<Vec<Statement>, Error> {
    let count = wire.len();
    wire.into_iter()
        .enumerate()
        .map(|(i, s)| {
            let params = s
                .params
                .into_iter()
                .enumerate()
                .map(|(n, v)| datum(n + 1, v))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| match count {
                    1 => Error::InvalidArgument(m),
                    n => Error::InvalidArgument(format!("statement {} of {n}: {m}", i + 1)),
                })?;
            Ok(Statement { sql: s.sql, params })
        })
        .collect()
}

/// A statement's result for the wire, whole.
pub fn statement_result(r: Rows) -> proto::StatementResult {
    let (rows_affected, columns, rows) = rows(r);
    proto::StatementResult {
        rows_affected,
        columns,
        rows,
    }
}

/// A result from the wire (a stored one: every cell has a value; one without reads as NULL).
pub fn rows_of(r: proto::StatementResult) -> Rows {
    Rows {
        rows_affected: r.rows_affected,
        columns: r.columns,
        rows: r.rows.into_iter().map(row_of).collect(),
    }
}

fn row_of(row: proto::Row) -> Vec<Datum> {
    row.values
        .into_iter()
        .map(|v| datum(0, v).unwrap_or(Datum::Null))
        .collect()
}

/// A saga step as the coordinator sent it. Secrets and parameters are checked here, before
/// anything runs.
pub fn saga_step(req: proto::SagaStepRequest) -> Result<StepCall, Error> {
    let op = match req.op() {
        proto::SagaOp::Action => Op::Action,
        proto::SagaOp::Compensate => Op::Compensate,
        proto::SagaOp::Forget => Op::Forget,
        proto::SagaOp::Unspecified => {
            return Err(Error::InvalidArgument(
                "op must be SAGA_OP_ACTION, SAGA_OP_COMPENSATE or SAGA_OP_FORGET".into(),
            ));
        }
    };
    let secret = |bytes: Vec<u8>, which: &str| {
        MarkerSecret::new(bytes).map_err(|e| Error::InvalidArgument(format!("{which}: {e}")))
    };
    let action_secret = secret(req.action_secret, "action_secret")?;
    let compensation_secret = match op {
        Op::Action => None,
        Op::Compensate | Op::Forget => {
            Some(secret(req.compensation_secret, "compensation_secret")?)
        }
    };
    let statements = checked(req.statements)?;
    Ok(StepCall {
        saga_id: req.saga_id,
        step: req.step,
        op,
        action_secret,
        compensation_secret,
        statements,
        bind_outputs: req.bind_outputs,
        inputs: req.inputs.into_iter().map(row_of).collect(),
    })
}

/// RunSagaStep's answer.
pub fn saga_step_response(answer: StepAnswer) -> proto::SagaStepResponse {
    use proto::SagaStepOutcome as Outcome;
    let (outcome, output, error, sqlstate) = match answer {
        StepAnswer::Applied(r) => (Outcome::Applied, Some(statement_result(r)), "".into(), None),
        StepAnswer::Repeated(r) => (
            Outcome::Repeated,
            Some(statement_result(r)),
            "".into(),
            None,
        ),
        StepAnswer::Failed { error, sqlstate } => (Outcome::Failed, None, error, sqlstate),
        StepAnswer::Fenced => (Outcome::Fenced, None, "".into(), None),
        StepAnswer::Null => (Outcome::Null, None, "".into(), None),
    };
    proto::SagaStepResponse {
        outcome: outcome as i32,
        output,
        error,
        sqlstate: sqlstate.unwrap_or_default(),
    }
}

/// A statement's result for the wire.
fn rows(r: Rows) -> (u64, Vec<String>, Vec<proto::Row>) {
    let rows = r
        .rows
        .into_iter()
        .map(|row| proto::Row {
            values: row.into_iter().map(value).collect(),
        })
        .collect();
    (r.rows_affected, r.columns, rows)
}

/// Execute's answer: the one statement's result in the top-level fields, or a batch's one
/// per statement in `results`.
pub fn execute_response(
    participant_id: String,
    batch: bool,
    mut results: Vec<Rows>,
) -> proto::ExecuteResponse {
    match batch {
        true => proto::ExecuteResponse {
            participant_id,
            results: results.into_iter().map(statement_result).collect(),
            ..Default::default()
        },
        false => {
            let (rows_affected, columns, rows) =
                rows(results.pop().expect("one result per statement"));
            proto::ExecuteResponse {
                participant_id,
                rows_affected,
                columns,
                rows,
                ..Default::default()
            }
        }
    }
}

/// A wait of one of this participant's branches, as the deadlock detector receives it.
pub fn lock_wait(participant_id: &str, w: BranchWait) -> proto::LockWait {
    proto::LockWait {
        participant_id: participant_id.to_string(),
        waiter_txn_id: w.waiter.to_string(),
        holder_txn_id: w.holder_txn.map(|t| t.to_string()).unwrap_or_default(),
        holder: w.holder,
        waited_ms: w.waited_ms,
        lock: w.lock,
    }
}

/// A prepared branch, as recovery and operators list it.
pub fn prepared_branch(p: database::PreparedBranch) -> proto::PreparedBranch {
    proto::PreparedBranch {
        txn_id: p.gid.txn.to_string(),
        coordinator_id: p.gid.coordinator_id.clone(),
        gid: p.gid.to_string(),
        xid: p.xid,
        age_ms: (p.age_s * 1000.0) as i64,
    }
}
