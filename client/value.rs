//! Statement parameters and result rows as Rust values: `i64`, `f64`, `bool`, `&str`/`String`,
//! `&[u8]`/`Vec<u8>`, and `Option` of any of them for NULL. Any other PostgreSQL type travels
//! in its text form (numeric, timestamps, uuid, json, arrays, ...): pass it as a string with a
//! cast in the SQL (`$1::numeric`), read it as a `String`.

use super::Error;
use crate::proto::{self, value::Kind};

/// A value that can be bound to a statement parameter.
pub trait ToValue {
    fn to_value(&self) -> proto::Value;
}

/// A value that can be read from a result cell.
pub trait FromValue: Sized {
    /// `None`: the cell does not hold this type (NULL included, unless `Self` is an `Option`).
    fn from_value(value: &proto::Value) -> Option<Self>;
}

fn value(kind: Kind) -> proto::Value {
    proto::Value { kind: Some(kind) }
}

impl ToValue for i64 {
    fn to_value(&self) -> proto::Value {
        value(Kind::IntValue(*self))
    }
}

impl ToValue for i32 {
    fn to_value(&self) -> proto::Value {
        value(Kind::IntValue((*self).into()))
    }
}

impl ToValue for f64 {
    fn to_value(&self) -> proto::Value {
        value(Kind::DoubleValue(*self))
    }
}

impl ToValue for bool {
    fn to_value(&self) -> proto::Value {
        value(Kind::BoolValue(*self))
    }
}

impl ToValue for str {
    fn to_value(&self) -> proto::Value {
        value(Kind::TextValue(self.to_string()))
    }
}

impl ToValue for String {
    fn to_value(&self) -> proto::Value {
        self.as_str().to_value()
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> proto::Value {
        value(Kind::BytesValue(self.to_vec()))
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> proto::Value {
        self.as_slice().to_value()
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> proto::Value {
        (**self).to_value()
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> proto::Value {
        match self {
            Some(v) => v.to_value(),
            None => value(Kind::NullValue(true)),
        }
    }
}

impl FromValue for i64 {
    fn from_value(v: &proto::Value) -> Option<Self> {
        match v.kind {
            Some(Kind::IntValue(i)) => Some(i),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    fn from_value(v: &proto::Value) -> Option<Self> {
        match v.kind {
            Some(Kind::DoubleValue(f)) => Some(f),
            _ => None,
        }
    }
}

impl FromValue for bool {
    fn from_value(v: &proto::Value) -> Option<Self> {
        match v.kind {
            Some(Kind::BoolValue(b)) => Some(b),
            _ => None,
        }
    }
}

impl FromValue for String {
    fn from_value(v: &proto::Value) -> Option<Self> {
        match &v.kind {
            Some(Kind::TextValue(s)) => Some(s.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &proto::Value) -> Option<Self> {
        match &v.kind {
            Some(Kind::BytesValue(b)) => Some(b.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &proto::Value) -> Option<Self> {
        match v.kind {
            None | Some(Kind::NullValue(_)) => Some(None),
            _ => T::from_value(v).map(Some),
        }
    }
}

/// What a statement returned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    /// How many rows an INSERT, UPDATE or DELETE touched.
    pub affected: u64,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<proto::Value>>,
}

impl Rows {
    /// Cell `column` of row `row`, as `T`: a column index or name.
    pub fn get<T: FromValue>(&self, row: usize, column: impl Column) -> Result<T, Error> {
        let c = column.index(&self.columns)?;
        let cell = self
            .rows
            .get(row)
            .ok_or_else(|| {
                Error::Invalid(format!("no row {row}: the result has {}", self.rows.len()))
            })?
            .get(c)
            .ok_or_else(|| Error::Invalid(format!("no column {c} in row {row}")))?;
        T::from_value(cell).ok_or_else(|| {
            Error::Invalid(format!(
                "row {row}, column {:?} holds {:?}, not a {}",
                self.columns[c],
                cell.kind,
                std::any::type_name::<T>()
            ))
        })
    }

    /// The first column of the first row: what `SELECT count(*) …` returns.
    pub fn scalar<T: FromValue>(&self) -> Result<T, Error> {
        self.get(0, 0)
    }
}

/// How a cell's column is named: by index or by name.
pub trait Column {
    fn index(&self, columns: &[String]) -> Result<usize, Error>;
}

impl Column for usize {
    fn index(&self, columns: &[String]) -> Result<usize, Error> {
        (*self < columns.len()).then_some(*self).ok_or_else(|| {
            Error::Invalid(format!(
                "no column {self}: the result has {}",
                columns.len()
            ))
        })
    }
}

impl Column for &str {
    fn index(&self, columns: &[String]) -> Result<usize, Error> {
        columns
            .iter()
            .position(|c| c == self)
            .ok_or_else(|| Error::Invalid(format!("no column {self:?} in {columns:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_go_out_and_come_back_as_the_same_rust_types() {
        let rows = Rows {
            affected: 0,
            columns: vec![
                "n".into(),
                "x".into(),
                "ok".into(),
                "s".into(),
                "b".into(),
                "none".into(),
            ],
            rows: vec![vec![
                42i64.to_value(),
                1.5f64.to_value(),
                true.to_value(),
                "hé".to_value(),
                b"\x00\x01".as_slice().to_value(),
                None::<i64>.to_value(),
            ]],
        };

        assert_eq!(rows.get::<i64>(0, "n").unwrap(), 42);
        assert_eq!(rows.get::<f64>(0, 1).unwrap(), 1.5);
        assert!(rows.get::<bool>(0, "ok").unwrap());
        assert_eq!(rows.get::<String>(0, "s").unwrap(), "hé");
        assert_eq!(rows.get::<Vec<u8>>(0, "b").unwrap(), vec![0, 1]);
        assert_eq!(rows.get::<Option<i64>>(0, "none").unwrap(), None);
        assert_eq!(rows.get::<Option<i64>>(0, "n").unwrap(), Some(42));
        assert!(rows.get::<i64>(0, "s").is_err(), "a string is no integer");
        assert!(rows.get::<i64>(0, "none").is_err(), "NULL needs an Option");
        assert!(rows.get::<i64>(1, 0).is_err() && rows.get::<i64>(0, "missing").is_err());
    }
}
