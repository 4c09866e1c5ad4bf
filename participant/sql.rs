//! Running a client's statement on PostgreSQL: parameters in, rows out. What a branch accepts
//! in the first place (the statements it refuses, the size of a request) is `statement.rs`.
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
use super::statement::leading_words;
use super::statement::{Datum, Rows};
pub use super::statement::{Limits, SqlError};
use bytes::BytesMut;
use deadpool_postgres::ClientWrapper;
use futures::StreamExt;
use std::error::Error as StdError;
use tokio_postgres::types::{Format, FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Row};

/// The most statements kept prepared per connection; past it the cache starts afresh, so a
/// client sending ever-new SQL texts cannot grow a PostgreSQL backend without bound.
const STATEMENT_CACHE_MAX: usize = 256;

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

fn param(v: &Datum) -> TextParam {
    TextParam(match v {
        Datum::Null => None,
        Datum::Bool(b) => Some(b.to_string()),
        Datum::Int(i) => Some(i.to_string()),
        Datum::Double(d) if d.is_nan() => Some("NaN".into()),
        Datum::Double(d) if d.is_infinite() => {
            Some(if *d > 0.0 { "Infinity" } else { "-Infinity" }.into())
        }
        Datum::Double(d) => Some(format!("{d:?}")),
        Datum::Text(s) => Some(s.clone()),
        // bytea's text input form.
        Datum::Bytes(b) => Some(format!(
            "\\x{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )),
    })
}

/// Runs one statement on the branch's connection.
///
/// With `begin`, the branch's transaction is opened first: `BEGIN` goes out together with the
/// statement's Parse (one round trip; the client pipelines them), and the statement runs only
/// once BEGIN is known to have succeeded — otherwise it would run, and commit, on its own.
pub async fn execute(
    client: &ClientWrapper,
    sql: &str,
    params: &[Datum],
    begin: bool,
    limits: &Limits,
) -> Result<Rows, SqlError> {
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
    params: &[Datum],
    begin: bool,
    limits: &Limits,
) -> Result<Rows, SqlError> {
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
    let bound: Vec<TextParam> = params.iter().map(param).collect();
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
    Ok(Rows {
        rows_affected,
        columns,
        rows: converted,
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
async fn convert_rows(client: &Client, rows: &[Row]) -> Result<Vec<Vec<Datum>>, SqlError> {
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
            let cell = if decoded_here(col.type_()) {
                decode_cell(row, i, col.type_())?
            } else if record::is_anonymous(col.type_()) {
                anonymous.next().flatten().map(Datum::Text)
            } else {
                printed.next().flatten().map(Datum::Text)
            };
            values.push(cell.unwrap_or(Datum::Null));
        }
        converted.push(values);
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
fn decode_cell(row: &Row, i: usize, ty: &Type) -> Result<Option<Datum>, tokio_postgres::Error> {
    Ok(match *ty {
        Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(Datum::Bool),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)?
            .map(|v| Datum::Int(v.into())),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)?
            .map(|v| Datum::Int(v.into())),
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Datum::Int),
        Type::OID => row
            .try_get::<_, Option<u32>>(i)?
            .map(|v| Datum::Int(v.into())),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(i)?
            .map(|v| Datum::Double(v.into())),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Datum::Double),
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Datum::Bytes),
        _ => row.try_get::<_, Option<String>>(i)?.map(Datum::Text),
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

    #[test]
    fn parameters_travel_as_text() {
        assert_eq!(param(&Datum::Int(-5)).0.as_deref(), Some("-5"));
        assert_eq!(param(&Datum::Double(0.1)).0.as_deref(), Some("0.1"));
        assert_eq!(
            param(&Datum::Bytes(vec![0, 255])).0.as_deref(),
            Some("\\x00ff")
        );
        assert_eq!(param(&Datum::Null).0, None);
    }
}
