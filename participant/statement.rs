//! A statement as a branch runs it, whatever database it runs on: its text and parameters
//! ([`Statement`], [`Datum`]), what it returns ([`Rows`]), what a branch accepts (the
//! statements that would end or escape the branch's transaction are refused: only the
//! coordinator ends it; a request's size limits), and how a statement can fail. The wire types
//! become these in `wire.rs`; the PostgreSQL code (`sql.rs`) runs what passes.

/// A value a statement binds to `$n`, or one cell of its result: the types the wire has a
/// field for. Any other PostgreSQL type travels as `Text`, in PostgreSQL's own text form.
#[derive(Clone, Debug, PartialEq)]
pub enum Datum {
    Null,
    Bool(bool),
    Int(i64),
    Double(f64),
    Text(String),
    Bytes(Vec<u8>),
}

/// One statement of an Execute.
#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    pub sql: String,
    /// Bound to `$1..$n`, never spliced into the text.
    pub params: Vec<Datum>,
}

impl Statement {
    /// A statement without parameters.
    pub fn new(sql: impl Into<String>) -> Statement {
        Statement {
            sql: sql.into(),
            params: Vec::new(),
        }
    }
}

/// What one statement returned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    /// Rows written by an INSERT, UPDATE or DELETE (or returned by a query).
    pub rows_affected: u64,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Datum>>,
}

/// The most SQL text one Execute carries by default (`--max-sql-bytes`).
pub const MAX_SQL_BYTES: usize = 1 << 20;

/// The most parameters one statement takes by default (`--max-params`): PostgreSQL's own
/// limit (a 16-bit count), so a lower setting is the only one that changes anything.
pub const MAX_PARAMS: usize = 65_535;

/// The most rows one Execute returns by default (`--max-result-rows`).
pub const MAX_RESULT_ROWS: usize = 100_000;

/// The most result data one Execute returns by default (`--max-result-bytes`), counted as
/// PostgreSQL sends it: gRPC clients refuse messages over 4 MiB unless told otherwise, so a
/// larger answer would fail there anyway, after the participant had held it all in memory.
pub const MAX_RESULT_BYTES: usize = 4 << 20;

/// What one Execute may carry and return. A request over a limit is refused before it reaches
/// PostgreSQL (INVALID_ARGUMENT, the branch unharmed); a result over one fails its statement
/// whole, never truncated (RESOURCE_EXHAUSTED, the branch doomed). Each message names its flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct Limits {
    /// The most SQL text one Execute carries, in bytes; send data as parameters.
    #[arg(long = "max-sql-bytes", env = "TWOPC_MAX_SQL_BYTES", default_value_t = MAX_SQL_BYTES)]
    pub sql_bytes: usize,
    /// The most parameters one statement takes (PostgreSQL's own limit is 65,535).
    #[arg(long = "max-params", env = "TWOPC_MAX_PARAMS", default_value_t = MAX_PARAMS)]
    pub params: usize,
    /// The most rows one Execute returns; a larger result fails its statement.
    #[arg(long = "max-result-rows", env = "TWOPC_MAX_RESULT_ROWS", default_value_t = MAX_RESULT_ROWS)]
    pub result_rows: usize,
    /// The most result data one Execute returns, in bytes as PostgreSQL sends it; a larger
    /// result fails its statement. Clients that raise their gRPC message limit may raise it.
    #[arg(long = "max-result-bytes", env = "TWOPC_MAX_RESULT_BYTES", default_value_t = MAX_RESULT_BYTES)]
    pub result_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            sql_bytes: MAX_SQL_BYTES,
            params: MAX_PARAMS,
            result_rows: MAX_RESULT_ROWS,
            result_bytes: MAX_RESULT_BYTES,
        }
    }
}

impl Limits {
    /// Refuses a request over the limits, before anything reaches PostgreSQL.
    pub fn check_request(&self, sql: &str, params: usize) -> Result<(), SqlError> {
        if sql.len() > self.sql_bytes {
            return Err(SqlError::Refused(format!(
                "sql is {} bytes, over the {} one Execute may carry (--max-sql-bytes of this participant); send data as parameters",
                sql.len(),
                self.sql_bytes
            )));
        }
        if params > self.params {
            return Err(SqlError::Refused(format!(
                "{params} parameters, over the {} one statement may take (--max-params of this participant; PostgreSQL's own limit is {MAX_PARAMS})",
                self.params
            )));
        }
        Ok(())
    }
}

/// What went wrong before or while running a statement.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// Refused before reaching PostgreSQL; the branch is unharmed.
    #[error("{0}")]
    Refused(String),
    /// The statement ran but its result is over a limit: it fails (never truncated), and the
    /// branch is doomed like after any failed statement.
    #[error("{0}")]
    OverLimit(String),
    /// PostgreSQL (or the connection to it) failed the statement; the branch is doomed.
    /// `message` is PostgreSQL's, as a person reads it; `sqlstate` is absent when the
    /// connection itself failed.
    #[error("{message}")]
    Failed {
        message: String,
        sqlstate: Option<String>,
    },
}

/// Refuses statements that would end or escape the branch's transaction, or leave state on
/// the connection for the next branch: a `COMMIT` sent through Execute would commit one
/// database while the others wait for the coordinator, and a statement prepared in SQL would
/// outlive the branch on a connection the next branch reuses. Nor may a branch change what
/// later sessions start with (`ALTER ROLE … SET`, `ALTER DATABASE … SET`, `ALTER SYSTEM`):
/// the session reset after each branch returns to exactly those defaults.
pub fn check_allowed(sql: &str) -> Result<(), SqlError> {
    let words = leading_words(sql, 3);
    let first = words.first().map(String::as_str).unwrap_or("");
    let second = words.get(1).map(String::as_str).unwrap_or("");
    let third = words.get(2).map(String::as_str).unwrap_or("");
    let ends_transaction = match first {
        "BEGIN" | "START" | "COMMIT" | "END" | "ABORT" => true,
        // ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] x stays inside the transaction.
        "ROLLBACK" => {
            !(second == "TO" || (matches!(second, "WORK" | "TRANSACTION") && third == "TO"))
        }
        "PREPARE" => second == "TRANSACTION",
        _ => false,
    };
    if ends_transaction {
        return Err(SqlError::Refused(format!(
            "{first} is not allowed through Execute: the coordinator ends the transaction (call Coordinator.Commit or Abort)"
        )));
    }
    if first == "ALTER" && matches!(second, "ROLE" | "USER" | "GROUP" | "DATABASE" | "SYSTEM") {
        return Err(SqlError::Refused(format!(
            "ALTER {second} is not allowed through Execute: it outlives the transaction and changes what every later session of this participant starts with (the role's or database's settings, password, limits), the participant's own included. Run it as an administrator, outside twopc"
        )));
    }
    let refused = match first {
        "PREPARE" => {
            "PREPARE is not allowed through Execute: a statement prepared in SQL would outlive the branch on a connection the next branch reuses. Send the statement itself, with $1, $2, ... parameters: the participant keeps repeated statements prepared"
        }
        "EXECUTE" => {
            "EXECUTE is not allowed through Execute: statements prepared in SQL are refused, and the ones the participant keeps prepared on the connection are its own. Send the statement itself, with $1, $2, ... parameters"
        }
        "DEALLOCATE" => {
            "DEALLOCATE is not allowed through Execute: the participant keeps its own prepared statements on the connection"
        }
        "" => "sql is empty",
        _ => return Ok(()),
    };
    Err(SqlError::Refused(refused.into()))
}

/// The first `n` words of the statement, upper-cased, skipping whitespace and comments. A
/// character that starts no word (`(` of a parenthesised query) ends the list as a word.
pub(super) fn leading_words(sql: &str, n: usize) -> Vec<String> {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut words = Vec::new();
    while i < b.len() && words.len() < n {
        if b[i].is_ascii_whitespace() {
            i += 1;
        } else if b[i..].starts_with(b"--") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            // PostgreSQL's block comments nest.
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i].is_ascii_alphabetic() || b[i] == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            words.push(sql[start..i].to_ascii_uppercase());
        } else {
            words.extend(sql[i..].chars().next().map(String::from));
            break;
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any statement text is allowed or refused, never a panic (comments, quotes, bytes
        /// that end mid-character).
        #[test]
        fn any_sql_is_checked_without_panicking(sql in "(?s).{0,200}") {
            let _ = check_allowed(&sql);
        }

        /// Whatever comments and whitespace (PostgreSQL's: ASCII only) come first, COMMIT is
        /// refused.
        #[test]
        fn commit_behind_any_comments_is_refused(
            comments in proptest::collection::vec("(--[^\n]*\n|/\\*[a-z ]*\\*/|[ \t\r\n])", 0..5)
        ) {
            let sql = format!("{}COMMIT", comments.concat());
            proptest::prop_assert!(check_allowed(&sql).is_err(), "{sql:?}");
        }
    }

    #[test]
    fn statements_that_escape_the_branch_are_refused_even_behind_comments() {
        for sql in [
            "COMMIT",
            "  commit;",
            "/* a /* nested */ comment */ END",
            "-- hi\nROLLBACK",
            "rollback prepared 'x'",
            "prepare transaction 'x'",
            "BEGIN",
            "start transaction",
            "DEALLOCATE ALL",
            "PREPARE q AS SELECT 1",
            "execute s0",
            "",
            "  -- only a comment",
            // Persisted for every later session, the participant's own.
            "ALTER ROLE app SET search_path = pg_temp",
            "alter user current_user set default_transaction_read_only = on",
            "/* x */ ALTER DATABASE app SET statement_timeout = 1",
            "ALTER SYSTEM SET fsync = off",
            "alter role app password 'x'",
        ] {
            assert!(check_allowed(sql).is_err(), "{sql:?} allowed");
        }
        for sql in [
            "SELECT 1",
            "rollback to savepoint a",
            "ROLLBACK WORK TO a",
            "rollback transaction to savepoint a",
            "SAVEPOINT a",
            "update t set x = 1",
            "(SELECT 1)",
            " /* c */ ((select 1) union (select 2))",
            "DO $$BEGIN EXECUTE 'SELECT 1'; END$$",
            "ALTER TABLE t ADD COLUMN y int",
        ] {
            assert!(check_allowed(sql).is_ok(), "{sql:?} refused");
        }
    }
}
