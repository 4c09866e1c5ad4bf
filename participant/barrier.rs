//! A saga step's barrier (docs/SAGAS.md §4): why a repeated action runs nothing, why a
//! compensation of an action that never ran is null, and why that action, arriving late, can
//! no longer run.
//!
//! Each action and each compensation runs in one local PostgreSQL transaction of its own, and
//! the first thing that transaction does is insert the step's barrier row:
//!
//! - an **action** inserts its `action` row. Inserted: its statements run and their output is
//!   stored in the row. Already there: a repeat (answer the stored output), or a `fence` a
//!   compensation left (answer FENCED); nothing runs.
//! - a **compensation** inserts its `compensate` row (already there: a repeat, nothing runs),
//!   then tries the action's row as a `fence`. Inserted: the action never ran here, so nothing
//!   is undone and the action is shut out should it come; already there: the action ran, and
//!   the compensation's statements run, with the action's output if asked.
//!
//! Two calls of one step at once serialize on the row's primary key: the second waits for the
//! first's transaction and then sees its row, so the answer is the same as one after the other.
//!
//! The rows are out of the clients' reach as the one-phase markers are (`marker.rs` says why
//! and how): the table belongs to [`marker::OWNER`](super::marker::OWNER), only `SECURITY
//! DEFINER` functions write it, and a row is addressed by the SHA-256 of a secret the
//! coordinator derives from its log's key. A client's SQL can neither plant a fence that
//! stops someone's action nor an action row that makes it a no-op.

use super::statement::{Datum, Rows, SqlError, Statement};
use crate::proto::marker::MarkerSecret;

/// Which half of a step, or its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Action,
    Compensate,
    /// The saga is final and past its retention: its rows go.
    Forget,
}

/// One step as the coordinator sends it.
#[derive(Debug)]
pub struct StepCall {
    pub saga_id: String,
    pub step: String,
    pub op: Op,
    /// Addresses the action's row (an action's own; a compensation's fence).
    pub action_secret: MarkerSecret,
    /// Addresses the compensation's row; for [`Op::Compensate`] and [`Op::Forget`].
    pub compensation_secret: Option<MarkerSecret>,
    pub statements: Vec<Statement>,
    /// Append values to every statement's params: `inputs` for an action, the action's first
    /// output row for a compensation.
    pub bind_outputs: bool,
    /// The first row of each step an action depends on.
    pub inputs: Vec<Vec<Datum>>,
}

/// What a step did.
#[derive(Debug, PartialEq)]
pub enum StepAnswer {
    /// Ran and committed with its barrier row; an action's last statement's result.
    Applied(Rows),
    /// Ran earlier: nothing ran now. An action answers its first run's output.
    Repeated(Rows),
    /// A statement failed for good: the local transaction rolled back, nothing applied.
    Failed {
        error: String,
        sqlstate: Option<String>,
    },
    /// An action whose compensation came first: nothing ran.
    Fenced,
    /// A compensation whose action never ran here: nothing ran; the action is fenced off.
    Null,
}

/// The action's row: `fresh` (inserted now: run the statements), else `fenced` or the stored
/// `output` of the first run. `$1` the action's secret.
pub const ACTION: &str =
    "SELECT fresh, fenced, output FROM twopc.barrier_action($1::pg_catalog.bytea)";

/// Stores an action's output in its row, in the action's transaction. `$1` secret, `$2` output.
pub const RECORD_OUTPUT: &str =
    "SELECT twopc.barrier_output($1::pg_catalog.bytea, $2::pg_catalog.bytea)";

/// The compensation's row and the action's fence: `repeat` (the compensation ran before),
/// `null` (the action never ran: fenced now), else the action's `output`. `$1` the action's
/// secret, `$2` the compensation's.
pub const COMPENSATE: &str = "SELECT repeat, null_compensation, output \
     FROM twopc.barrier_compensate($1::pg_catalog.bytea, $2::pg_catalog.bytea)";

/// Deletes a final saga's step rows (its action's or fence, its compensation's). `$1` the
/// action's secret, `$2` the compensation's.
pub const FORGET: &str = "SELECT twopc.barrier_forget($1::pg_catalog.bytea, $2::pg_catalog.bytea)";

/// The barrier's table and functions, for `setup_sql`: after the markers' part, which creates
/// the owner role and the schema. `role` is quoted.
pub fn setup_sql(role: &str, owner: &str) -> String {
    format!(
        r#"
-- Saga steps' barrier rows (docs/SAGAS.md §4), addressed by the SHA-256 of the coordinator's
-- per-step secrets, written only through the functions below.
CREATE TABLE IF NOT EXISTS twopc.saga_barrier (
    key bytea PRIMARY KEY,
    -- action: the action ran (its output beside it); fence: a compensation came first, the
    -- action never runs; compensate: the compensation ran.
    kind text NOT NULL CHECK (kind IN ('action', 'fence', 'compensate')),
    output bytea,
    at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE twopc.saga_barrier OWNER TO {owner};
REVOKE ALL ON TABLE twopc.saga_barrier FROM PUBLIC;

CREATE OR REPLACE FUNCTION twopc.barrier_action(action_secret bytea,
    OUT fresh boolean, OUT fenced boolean, OUT output bytea)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
  found_kind text;
BEGIN
  IF octet_length(action_secret) < 16 THEN
    RAISE EXCEPTION 'a saga barrier secret is at least 16 bytes';
  END IF;
  INSERT INTO twopc.saga_barrier (key, kind) VALUES (sha256(action_secret), 'action')
  ON CONFLICT (key) DO NOTHING;
  fresh := FOUND;
  fenced := false;
  IF NOT fresh THEN
    SELECT b.kind, b.output INTO found_kind, output
      FROM twopc.saga_barrier AS b WHERE b.key = sha256(action_secret);
    fenced := found_kind = 'fence';
  END IF;
END
$f$;

CREATE OR REPLACE FUNCTION twopc.barrier_output(action_secret bytea, step_output bytea)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
  UPDATE twopc.saga_barrier SET output = step_output
   WHERE key = sha256(action_secret) AND kind = 'action' AND output IS NULL
$f$;

CREATE OR REPLACE FUNCTION twopc.barrier_compensate(action_secret bytea,
    compensation_secret bytea, OUT repeat boolean, OUT null_compensation boolean,
    OUT output bytea)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  IF octet_length(action_secret) < 16 OR octet_length(compensation_secret) < 16 THEN
    RAISE EXCEPTION 'a saga barrier secret is at least 16 bytes';
  END IF;
  INSERT INTO twopc.saga_barrier (key, kind) VALUES (sha256(compensation_secret), 'compensate')
  ON CONFLICT (key) DO NOTHING;
  repeat := NOT FOUND;
  null_compensation := false;
  IF repeat THEN
    RETURN;
  END IF;
  -- Waits for an action of the same step still in flight, then sees its row.
  INSERT INTO twopc.saga_barrier (key, kind) VALUES (sha256(action_secret), 'fence')
  ON CONFLICT (key) DO NOTHING;
  null_compensation := FOUND;
  IF NOT null_compensation THEN
    SELECT b.output INTO output FROM twopc.saga_barrier AS b
     WHERE b.key = sha256(action_secret) AND b.kind = 'action';
  END IF;
END
$f$;

-- A final saga's rows, once its coordinator no longer keeps it: only by the secrets.
CREATE OR REPLACE FUNCTION twopc.barrier_forget(action_secret bytea, compensation_secret bytea)
RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
  WITH gone AS (
    DELETE FROM twopc.saga_barrier
     WHERE key IN (sha256(action_secret), sha256(compensation_secret))
    RETURNING 1)
  SELECT count(*) FROM gone
$f$;

ALTER FUNCTION twopc.barrier_action(bytea) OWNER TO {owner};
ALTER FUNCTION twopc.barrier_forget(bytea, bytea) OWNER TO {owner};
ALTER FUNCTION twopc.barrier_output(bytea, bytea) OWNER TO {owner};
ALTER FUNCTION twopc.barrier_compensate(bytea, bytea) OWNER TO {owner};
REVOKE ALL ON FUNCTION twopc.barrier_action(bytea), twopc.barrier_output(bytea, bytea),
    twopc.barrier_compensate(bytea, bytea), twopc.barrier_forget(bytea, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION twopc.barrier_action(bytea), twopc.barrier_output(bytea, bytea),
    twopc.barrier_compensate(bytea, bytea), twopc.barrier_forget(bytea, bytea) TO {role};
"#
    )
}

/// Whether a statement's failure may pass if the step is sent again (a serialization failure,
/// a deadlock victim, a connection lost, a server short of resources or shutting down), as
/// opposed to one that fails the step for good (a constraint, bad data, a missing table).
pub fn is_transient(error: &SqlError) -> bool {
    match error {
        SqlError::Refused(_) | SqlError::OverLimit(_) => false,
        // No SQLSTATE: the connection itself failed.
        SqlError::Failed { sqlstate: None, .. } => true,
        SqlError::Failed {
            sqlstate: Some(code),
            ..
        } => matches!(
            code.get(..2),
            // connection exception, transaction rollback, insufficient resources, operator
            // intervention (a shutdown, a cancel), system error.
            Some("08" | "40" | "53" | "57" | "58")
        ),
    }
}

/// An action's output as its barrier row keeps it: the wire's `StatementResult`, so that a
/// repeat answers exactly what the first run did.
pub fn stored(rows: &Rows) -> Vec<u8> {
    prost::Message::encode_to_vec(&super::wire::statement_result(rows.clone()))
}

/// What [`stored`] kept; an empty or unreadable row is an empty result.
pub fn from_stored(bytes: &[u8]) -> Rows {
    <crate::proto::StatementResult as prost::Message>::decode(bytes)
        .map(super::wire::rows_of)
        .unwrap_or_default()
}

/// `statement` with `extra` appended to its params (`bind_outputs`).
pub fn bound(statement: &Statement, extra: &[Datum]) -> Statement {
    let mut params = statement.params.clone();
    params.extend_from_slice(extra);
    Statement {
        sql: statement.sql.clone(),
        params,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(code: Option<&str>) -> SqlError {
        SqlError::Failed {
            message: "x".into(),
            sqlstate: code.map(str::to_string),
        }
    }

    #[test]
    fn a_step_is_retried_only_for_failures_a_retry_can_cure() {
        for code in ["40001", "40P01", "08006", "53300", "57P01", "57014"] {
            assert!(is_transient(&failed(Some(code))), "{code}");
        }
        assert!(is_transient(&failed(None)), "the connection broke");
        for code in ["23505", "23514", "22003", "42P01", "42501", "P0001"] {
            assert!(!is_transient(&failed(Some(code))), "{code}");
        }
        assert!(!is_transient(&SqlError::Refused("COMMIT".into())));
    }

    #[test]
    fn a_stored_output_reads_back_as_it_was() {
        let rows = Rows {
            rows_affected: 1,
            columns: vec!["id".into(), "note".into()],
            rows: vec![vec![Datum::Int(7), Datum::Null]],
        };
        assert_eq!(from_stored(&stored(&rows)), rows);
        assert_eq!(from_stored(&[]), Rows::default());
    }

    #[test]
    fn outputs_are_bound_after_the_statements_own_params() {
        let s = Statement {
            sql: "UPDATE t SET n = n - $1 WHERE id = $2".into(),
            params: vec![Datum::Int(1)],
        };
        assert_eq!(
            bound(&s, &[Datum::Int(7)]).params,
            vec![Datum::Int(1), Datum::Int(7)]
        );
    }

    #[test]
    fn the_setup_names_the_owner_and_grants_the_role_only_the_functions() {
        let sql = setup_sql("\"app\"", "twopc_markers");
        assert!(sql.contains("ALTER TABLE twopc.saga_barrier OWNER TO twopc_markers"));
        assert!(sql.contains("REVOKE ALL ON TABLE twopc.saga_barrier FROM PUBLIC"));
        assert!(
            !sql.contains("ON TABLE twopc.saga_barrier TO"),
            "no table grant"
        );
        assert_eq!(sql.matches("SECURITY DEFINER").count(), 4);
    }
}
