//! Running a client's statement: parameters in, rows out, and the statements a branch refuses.
//!
//! Parameters are bound, never spliced into the SQL. Each travels in PostgreSQL's *text* format,
//! so the server parses it as whatever type it inferred for `$n`: an `int_value` binds to an
//! `int4`, `numeric` or `text` column alike, and a `text_value` can carry a date or a uuid.
//!
//! Result cells of the types the wire has a field for (integers, floats, bool, bytea, NULL) keep
//! their type; every other type becomes PostgreSQL's own text form, which the server itself
//! produces, so a timestamp or numeric reads exactly as psql would print it. A query, or an
//! `INSERT`/`UPDATE`/`DELETE … RETURNING`, is wrapped so the server prints those columns as it
//! produces them (`printing_statement`); any other statement's cells go back to the server
//! afterwards, thousands per round trip (`print_on_server`), except anonymous records, which
//! the server cannot take back and `record.rs` takes apart. Never one round trip per cell.
//!
//! Statements are prepared once per connection and kept (deadpool's statement cache, at most
//! `STATEMENT_CACHE_MAX` texts): a repeated statement costs no Parse round trip and no parse
//! and plan in PostgreSQL. A statement the server no longer has, or whose result type a schema
//! change altered, fails its branch once and empties that connection's cache.

use super::record;
use crate::proto::{self, value::Kind};
use bytes::BytesMut;
use deadpool_postgres::ClientWrapper;
use futures::StreamExt;
use std::error::Error as StdError;
use tokio_postgres::types::{Format, FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Row};

/// The most statements kept prepared per connection; past it the cache starts afresh, so a
/// client sending ever-new SQL texts cannot grow a PostgreSQL backend without bound.
const STATEMENT_CACHE_MAX: usize = 256;

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

impl From<tokio_postgres::Error> for SqlError {
    fn from(e: tokio_postgres::Error) -> Self {
        SqlError::Failed {
            message: super::postgres::describe(&e),
            sqlstate: e.code().map(|c| c.code().to_string()),
        }
    }
}

/// A parameter in text format; `None` is SQL NULL.
#[derive(Debug)]
struct TextParam(Option<String>);

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match &self.0 {
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// A result cell's bytes as the server sent them (binary format), for types we do not decode.
struct RawCell<'a>(&'a [u8]);

impl<'a> FromSql<'a> for RawCell<'a> {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(RawCell(raw))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// A binary-format parameter of any type (`None`: NULL): a [`RawCell`] sent back to be printed
/// as text.
#[derive(Debug)]
struct RawParam<'a>(Option<&'a [u8]>);

impl ToSql for RawParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self.0 {
            Some(raw) => {
                out.extend_from_slice(raw);
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn param(n: usize, v: &proto::Value) -> Result<TextParam, SqlError> {
    let text = match &v.kind {
        None => {
            return Err(SqlError::Refused(format!(
                "parameter ${n} has no value: set one of its fields (null_value: true for NULL)"
            )));
        }
        Some(Kind::NullValue(_)) => None,
        Some(Kind::BoolValue(b)) => Some(b.to_string()),
        Some(Kind::IntValue(i)) => Some(i.to_string()),
        Some(Kind::DoubleValue(d)) if d.is_nan() => Some("NaN".into()),
        Some(Kind::DoubleValue(d)) if d.is_infinite() => {
            Some(if *d > 0.0 { "Infinity" } else { "-Infinity" }.into())
        }
        Some(Kind::DoubleValue(d)) => Some(format!("{d:?}")),
        Some(Kind::TextValue(s)) => Some(s.clone()),
        // bytea's text input form.
        Some(Kind::BytesValue(b)) => Some(format!(
            "\\x{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )),
    };
    Ok(TextParam(text))
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
fn leading_words(sql: &str, n: usize) -> Vec<String> {
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

/// Runs one statement on the branch's connection.
///
/// With `begin`, the branch's transaction is opened first: `BEGIN` goes out together with the
/// statement's Parse (one round trip; the client pipelines them), and the statement runs only
/// once BEGIN is known to have succeeded — otherwise it would run, and commit, on its own.
pub async fn execute(
    client: &ClientWrapper,
    sql: &str,
    params: &[proto::Value],
    begin: bool,
    limits: &Limits,
) -> Result<proto::ExecuteResponse, SqlError> {
    let result = execute_prepared(client, sql, params, begin, limits).await;
    if let Err(SqlError::Failed {
        message,
        sqlstate: Some(code),
    }) = &result
        && super::marker::is_refused_reach(code, message)
    {
        super::ALARMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("twopc_atomicity_alarms_total").increment(1);
        tracing::error!(sql = %crate::proto::shown(sql), %message,
            "ATOMICITY ALARM: a client's statement tried to reach the one-phase markers; PostgreSQL refused it and its branch is doomed");
    }
    if let Err(SqlError::Failed {
        sqlstate: Some(code),
        ..
    }) = &result
        // invalid_sql_statement_name: a cached statement is gone (DEALLOCATE);
        // feature_not_supported: "cached plan must not change result type".
        && matches!(code.as_str(), "26000" | "0A000")
    {
        client.statement_cache.clear();
    }
    result
}

/// A statement prepared on this connection, from its cache when it was prepared before.
async fn prepared(
    client: &ClientWrapper,
    sql: &str,
) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
    if client.statement_cache.size() >= STATEMENT_CACHE_MAX {
        client.statement_cache.clear();
    }
    client.prepare_cached(sql).await
}

async fn execute_prepared(
    client: &ClientWrapper,
    sql: &str,
    params: &[proto::Value],
    begin: bool,
    limits: &Limits,
) -> Result<proto::ExecuteResponse, SqlError> {
    let stmt = if begin {
        let (began, stmt) = tokio::join!(client.batch_execute("BEGIN"), prepared(client, sql));
        began?;
        stmt?
    } else {
        prepared(client, sql).await?
    };
    if stmt.params().len() != params.len() {
        return Err(SqlError::Refused(format!(
            "the statement has {} parameter(s) ($1..${0}) but {} value(s) were given",
            stmt.params().len(),
            params.len()
        )));
    }
    let bound = params
        .iter()
        .enumerate()
        .map(|(i, v)| param(i + 1, v))
        .collect::<Result<Vec<_>, _>>()?;
    let printing = match stmt.columns().iter().any(|c| !decoded_here(c.type_())) {
        true => printing_statement(client, sql, &stmt).await?,
        false => None,
    };
    let (rows, rows_affected) = match &printing {
        Some(wrapped) => {
            let (ran, released) = tokio::join!(
                run(client, wrapped, &bound, limits),
                client.batch_execute("RELEASE SAVEPOINT twopc_print")
            );
            let ran = ran?;
            released?;
            ran
        }
        None => run(client, &stmt, &bound, limits).await?,
    };
    let columns = stmt
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let converted = convert_rows(client, &rows).await?;
    Ok(proto::ExecuteResponse {
        rows_affected,
        columns,
        rows: converted,
        ..Default::default()
    })
}

/// Runs a prepared statement and collects its rows, within the result limits.
async fn run(
    client: &Client,
    stmt: &tokio_postgres::Statement,
    params: &[TextParam],
    limits: &Limits,
) -> Result<(Vec<Row>, u64), SqlError> {
    let stream = client.query_raw(stmt, params.iter()).await?;
    futures::pin_mut!(stream);
    let mut rows = Vec::new();
    let mut bytes = 0;
    while let Some(row) = stream.next().await {
        let row = row?;
        bytes += (0..row.len())
            .map(|i| match row.try_get::<_, Option<RawCell>>(i) {
                Ok(Some(cell)) => cell.0.len() + 4,
                _ => 4,
            })
            .sum::<usize>();
        if bytes > limits.result_bytes {
            return Err(SqlError::OverLimit(format!(
                "the result is over {} bytes after {} rows (--max-result-bytes of this participant): {PAGE}",
                limits.result_bytes,
                rows.len()
            )));
        }
        if rows.len() == limits.result_rows {
            return Err(SqlError::OverLimit(format!(
                "the result is over {} rows (--max-result-rows of this participant): {PAGE}",
                limits.result_rows
            )));
        }
        rows.push(row);
    }
    Ok((rows, stream.rows_affected().unwrap_or(0)))
}

/// What a result over a limit's message suggests.
const PAGE: &str = "select fewer rows or columns, or page with LIMIT/OFFSET or a cursor's FETCH";

/// For a statement whose result has columns of types the wire has no field for: the same
/// statement wrapped so that the server prints those columns as text while it produces them,
/// which costs it next to nothing (psql gets every cell that way). A query (`SELECT`, `VALUES`,
/// `TABLE`, `WITH`, or one in parentheses) becomes a subquery; an `INSERT`, `UPDATE` or
/// `DELETE … RETURNING` becomes a common table expression, since a data-modifying statement
/// cannot be a subquery. The wrapped form is parsed under a savepoint, because a statement
/// that fails to parse would abort the branch's transaction (a `WITH` holding an `UPDATE` cannot
/// be nested, for one): on any error the savepoint is rolled back and `None` says to print
/// afterwards (`print_on_server`). On `Some`, the savepoint `twopc_print` is open; the caller
/// releases it.
async fn printing_statement(
    client: &Client,
    sql: &str,
    stmt: &tokio_postgres::Statement,
) -> Result<Option<tokio_postgres::Statement>, tokio_postgres::Error> {
    let first = leading_words(sql, 1);
    let as_cte = match first.first().map(String::as_str) {
        Some("SELECT" | "VALUES" | "TABLE" | "WITH" | "(") => false,
        Some("INSERT" | "UPDATE" | "DELETE") => true,
        _ => return Ok(None),
    };
    let columns = stmt.columns();
    let aliases: Vec<String> = (1..=columns.len()).map(|i| format!("c{i}")).collect();
    let outputs: Vec<String> = columns
        .iter()
        .zip(&aliases)
        .map(|(c, a)| match decoded_here(c.type_()) {
            true => a.clone(),
            false => format!("{a}::text"),
        })
        .collect();
    // The newlines keep a trailing `--` comment from swallowing the closing parenthesis.
    let (outputs, aliases) = (outputs.join(", "), aliases.join(", "));
    let wrapped = match as_cte {
        false => format!("SELECT {outputs} FROM (\n{sql}\n) AS twopc_result({aliases})"),
        true => format!(
            "WITH twopc_result({aliases}) AS (\n{sql}\n) SELECT {outputs} FROM twopc_result"
        ),
    };
    let (saved, parsed) = tokio::join!(
        client.batch_execute("SAVEPOINT twopc_print"),
        client.prepare_typed(&wrapped, stmt.params())
    );
    saved?;
    match parsed {
        Ok(wrapped) => Ok(Some(wrapped)),
        Err(e) if e.as_db_error().is_some() => {
            tracing::debug!(error = %e, "cannot wrap the query to print its columns; printing afterwards");
            client
                .batch_execute("ROLLBACK TO SAVEPOINT twopc_print; RELEASE SAVEPOINT twopc_print")
                .await?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// How many cells one printing round trip carries (PostgreSQL allows 65,535 parameters; a
/// statement this size still parses in well under a millisecond).
const PRINT_BATCH: usize = 4096;

/// The rows for the wire: cells of the types it has a field for are decoded here; every other
/// column is printed by the server, many cells per round trip (never one per cell: 20,000 rows
/// of a numeric would be 20,000 round trips).
async fn convert_rows(client: &Client, rows: &[Row]) -> Result<Vec<proto::Row>, SqlError> {
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let cols_where = |f: fn(&Type) -> bool| -> Vec<usize> {
        first
            .columns()
            .iter()
            .enumerate()
            .filter(|(_, c)| f(c.type_()))
            .map(|(i, _)| i)
            .collect()
    };
    let printed_cols = cols_where(|t| !decoded_here(t) && !record::is_anonymous(t));
    let mut printed = print_on_server(client, rows, &printed_cols)
        .await?
        .into_iter();
    let mut anonymous = print_anonymous(client, rows, &cols_where(record::is_anonymous))
        .await?
        .into_iter();
    let mut converted = Vec::with_capacity(rows.len());
    for row in rows {
        let mut values = Vec::with_capacity(row.len());
        for (i, col) in row.columns().iter().enumerate() {
            let kind = if decoded_here(col.type_()) {
                decode_cell(row, i, col.type_())?
            } else if record::is_anonymous(col.type_()) {
                anonymous.next().flatten().map(Kind::TextValue)
            } else {
                printed.next().flatten().map(Kind::TextValue)
            };
            values.push(proto::Value {
                kind: Some(kind.unwrap_or(Kind::NullValue(true))),
            });
        }
        converted.push(proto::Row { values });
    }
    Ok(converted)
}

/// The text form of the anonymous records in columns `cols` (`record::is_anonymous`), row by
/// row: taken apart here, their fields printed by the server many per round trip.
async fn print_anonymous(
    client: &Client,
    rows: &[Row],
    cols: &[usize],
) -> Result<Vec<Option<String>>, SqlError> {
    if cols.is_empty() {
        return Ok(Vec::new());
    }
    let mut values = Vec::with_capacity(rows.len() * cols.len());
    for row in rows {
        for &i in cols {
            let oid = row.columns()[i].type_().oid();
            values.push(match row.try_get::<_, Option<RawCell>>(i)? {
                None => record::Value::Null,
                Some(cell) => record::parse(oid, cell.0).map_err(|e| SqlError::Failed {
                    message: e.to_string(),
                    sqlstate: None,
                })?,
            });
        }
    }
    let mut leaves = Vec::new();
    values.iter().for_each(|v| v.leaves(&mut leaves));
    let mut texts = Vec::with_capacity(leaves.len());
    for batch in leaves.chunks(PRINT_BATCH) {
        let types: Vec<Type> = batch
            .iter()
            .map(|(oid, _)| {
                // A type of this database (an enum, a composite): only its oid matters here.
                Type::from_oid(*oid).unwrap_or_else(|| {
                    Type::new(
                        format!("oid {oid}"),
                        *oid,
                        tokio_postgres::types::Kind::Simple,
                        String::new(),
                    )
                })
            })
            .collect();
        let list: Vec<String> = (1..=types.len()).map(|p| format!("${p}::text")).collect();
        let stmt = client
            .prepare_typed(&format!("SELECT ARRAY[{}]", list.join(",")), &types)
            .await?;
        let cells: Vec<RawParam> = batch.iter().map(|(_, raw)| RawParam(Some(raw))).collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            cells.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let printed: Vec<Option<String>> = client.query_one(&stmt, &params).await?.try_get(0)?;
        texts.extend(printed.into_iter().map(Option::unwrap_or_default));
    }
    let mut texts = texts.into_iter();
    Ok(values.iter().map(|v| v.render(&mut texts)).collect())
}

/// Whether a result column's type has a field on the wire (or is text already).
fn decoded_here(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::BOOL
            | Type::INT2
            | Type::INT4
            | Type::INT8
            | Type::OID
            | Type::FLOAT4
            | Type::FLOAT8
            | Type::BYTEA
    ) || <String as FromSql>::accepts(ty)
}

/// A cell of a type [`decoded_here`]. The column's declared type is checked by try_get, so
/// these cannot fail on a mismatch.
fn decode_cell(row: &Row, i: usize, ty: &Type) -> Result<Option<Kind>, tokio_postgres::Error> {
    Ok(match *ty {
        Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(Kind::BoolValue),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)?
            .map(|v| Kind::IntValue(v.into())),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)?
            .map(|v| Kind::IntValue(v.into())),
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Kind::IntValue),
        Type::OID => row
            .try_get::<_, Option<u32>>(i)?
            .map(|v| Kind::IntValue(v.into())),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(i)?
            .map(|v| Kind::DoubleValue(v.into())),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Kind::DoubleValue),
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Kind::BytesValue),
        _ => row.try_get::<_, Option<String>>(i)?.map(Kind::TextValue),
    })
}

/// The text form of the cells in columns `cols`, row by row, as the server prints them
/// (`$n::text` over the binary value, so the session's DateStyle, TimeZone and IntervalStyle
/// apply as in psql): the binary cells go back as parameters of their own types, many per
/// statement, and come back as one text array.
async fn print_on_server(
    client: &Client,
    rows: &[Row],
    cols: &[usize],
) -> Result<Vec<Option<String>>, tokio_postgres::Error> {
    if cols.is_empty() || rows.is_empty() {
        return Ok(Vec::new());
    }
    let rows_per_batch = (PRINT_BATCH / cols.len()).max(1);
    let mut out = Vec::with_capacity(rows.len() * cols.len());
    // Every full batch has the same shape: prepared once.
    let mut statement: Option<(usize, tokio_postgres::Statement)> = None;
    for batch in rows.chunks(rows_per_batch) {
        let stmt = match &statement {
            Some((n, stmt)) if *n == batch.len() => stmt.clone(),
            _ => {
                let types: Vec<Type> = (0..batch.len())
                    .flat_map(|_| cols.iter().map(|&i| rows[0].columns()[i].type_().clone()))
                    .collect();
                let list: Vec<String> = (1..=types.len()).map(|p| format!("${p}::text")).collect();
                let sql = format!("SELECT ARRAY[{}]", list.join(","));
                let stmt = client.prepare_typed(&sql, &types).await?;
                statement = Some((batch.len(), stmt.clone()));
                stmt
            }
        };
        let mut cells = Vec::with_capacity(batch.len() * cols.len());
        for row in batch {
            for &i in cols {
                cells.push(RawParam(row.try_get::<_, Option<RawCell>>(i)?.map(|c| c.0)));
            }
        }
        let params: Vec<&(dyn ToSql + Sync)> =
            cells.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let texts: Vec<Option<String>> = client.query_one(&stmt, &params).await?.try_get(0)?;
        out.extend(texts);
    }
    Ok(out)
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

    #[test]
    fn parameters_travel_as_text() {
        let v = |k| proto::Value { kind: Some(k) };
        assert_eq!(
            param(1, &v(Kind::IntValue(-5))).unwrap().0.as_deref(),
            Some("-5")
        );
        assert_eq!(
            param(1, &v(Kind::DoubleValue(0.1))).unwrap().0.as_deref(),
            Some("0.1")
        );
        assert_eq!(
            param(1, &v(Kind::BytesValue(vec![0, 255])))
                .unwrap()
                .0
                .as_deref(),
            Some("\\x00ff")
        );
        assert_eq!(param(1, &v(Kind::NullValue(true))).unwrap().0, None);
        assert!(param(3, &proto::Value { kind: None }).is_err());
    }
}
