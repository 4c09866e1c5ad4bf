//! Running a client's statement: parameters in, rows out, and the statements a branch refuses.
//!
//! Parameters are bound, never spliced into the SQL. Each travels in PostgreSQL's *text* format,
//! so the server parses it as whatever type it inferred for `$n`: an `int_value` binds to an
//! `int4`, `numeric` or `text` column alike, and a `text_value` can carry a date or a uuid.
//!
//! Result cells of the types the wire has a field for (integers, floats, bool, bytea, NULL) keep
//! their type; every other type becomes PostgreSQL's own text form, which the server itself
//! produces (`$1::text` over the binary value), so a timestamp or numeric reads exactly as psql
//! would print it.

use crate::proto::{self, value::Kind};
use bytes::BytesMut;
use futures::StreamExt;
use std::error::Error as StdError;
use tokio_postgres::types::{Format, FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Row};

/// What went wrong before or while running a statement.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// Refused before reaching PostgreSQL; the branch is unharmed.
    #[error("{0}")]
    Refused(String),
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
struct RawCell(Vec<u8>);

impl<'a> FromSql<'a> for RawCell {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(RawCell(raw.to_vec()))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// A binary-format parameter of any type: sends a [`RawCell`] back to be printed as text.
#[derive(Debug)]
struct RawParam<'a>(&'a [u8]);

impl ToSql for RawParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
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

/// Refuses statements that would end or escape the branch's transaction: a `COMMIT` sent
/// through Execute would commit one database while the others wait for the coordinator.
pub fn refuse_transaction_control(sql: &str) -> Result<(), SqlError> {
    let words = leading_words(sql, 3);
    let first = words.first().map(String::as_str).unwrap_or("");
    let second = words.get(1).map(String::as_str).unwrap_or("");
    let third = words.get(2).map(String::as_str).unwrap_or("");
    let refused = match first {
        "BEGIN" | "START" | "COMMIT" | "END" | "ABORT" => true,
        // ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] x stays inside the transaction.
        "ROLLBACK" => {
            !(second == "TO" || (matches!(second, "WORK" | "TRANSACTION") && third == "TO"))
        }
        "PREPARE" => second == "TRANSACTION",
        _ => false,
    };
    if refused {
        return Err(SqlError::Refused(format!(
            "{first} is not allowed through Execute: the coordinator ends the transaction (call Coordinator.Commit or Abort)"
        )));
    }
    if first.is_empty() {
        return Err(SqlError::Refused("sql is empty".into()));
    }
    Ok(())
}

/// The first `n` words of the statement, upper-cased, skipping whitespace and comments.
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
    client: &Client,
    sql: &str,
    params: &[proto::Value],
    begin: bool,
) -> Result<proto::ExecuteResponse, SqlError> {
    let stmt = if begin {
        let (began, stmt) = tokio::join!(client.batch_execute("BEGIN"), client.prepare(sql));
        began?;
        stmt?
    } else {
        client.prepare(sql).await?
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
    let stream = client.query_raw(&stmt, bound.iter()).await?;
    futures::pin_mut!(stream);
    let mut rows = Vec::new();
    while let Some(row) = stream.next().await {
        rows.push(row?);
    }
    let rows_affected = stream.rows_affected().unwrap_or(0);
    let columns = stmt
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let mut converted = Vec::with_capacity(rows.len());
    for row in &rows {
        converted.push(convert_row(client, row).await?);
    }
    Ok(proto::ExecuteResponse {
        rows_affected,
        columns,
        rows: converted,
    })
}

async fn convert_row(client: &Client, row: &Row) -> Result<proto::Row, tokio_postgres::Error> {
    let mut values = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        values.push(proto::Value {
            kind: Some(convert_cell(client, row, i, col.type_()).await?),
        });
    }
    Ok(proto::Row { values })
}

async fn convert_cell(
    client: &Client,
    row: &Row,
    i: usize,
    ty: &Type,
) -> Result<Kind, tokio_postgres::Error> {
    // The column's declared type is checked by try_get, so these cannot fail on a mismatch.
    let kind = match *ty {
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
        _ if <String as FromSql>::accepts(ty) => {
            row.try_get::<_, Option<String>>(i)?.map(Kind::TextValue)
        }
        _ => match row.try_get::<_, Option<RawCell>>(i)? {
            None => None,
            Some(raw) => {
                let print = client
                    .prepare_typed("SELECT $1::text", std::slice::from_ref(ty))
                    .await?;
                let text: String = client
                    .query_one(&print, &[&RawParam(&raw.0)])
                    .await?
                    .try_get(0)?;
                Some(Kind::TextValue(text))
            }
        },
    };
    Ok(kind.unwrap_or(Kind::NullValue(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_control_is_refused_even_behind_comments() {
        for sql in [
            "COMMIT",
            "  commit;",
            "/* a /* nested */ comment */ END",
            "-- hi\nROLLBACK",
            "rollback prepared 'x'",
            "prepare transaction 'x'",
            "BEGIN",
            "start transaction",
            "",
            "  -- only a comment",
        ] {
            assert!(refuse_transaction_control(sql).is_err(), "{sql:?} allowed");
        }
        for sql in [
            "SELECT 1",
            "rollback to savepoint a",
            "ROLLBACK WORK TO a",
            "rollback transaction to savepoint a",
            "SAVEPOINT a",
            "PREPARE q AS SELECT 1",
            "update t set x = 1",
        ] {
            assert!(refuse_transaction_control(sql).is_ok(), "{sql:?} refused");
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
