//! PostgreSQL's text form of anonymous records (`ROW(1, 'a b')`, `record[]`), built here from
//! their binary form.
//!
//! Cells of types the wire has no field for are printed by the server: sent back as
//! parameters of their own type and cast to text (`sql::print_on_server`). The server cannot
//! take an anonymous record back ("input of anonymous composite types is not implemented"), so
//! such a cell, from a statement that could not be wrapped to print in place (an `INSERT …
//! RETURNING ROW(…)`, a `FETCH`), would fail after the statement ran and doom its branch.
//! Instead the record is taken apart here: its fields (the leaves) still go to the server to be
//! printed, each as its own type, and the pieces are put together with the quoting rules of
//! PostgreSQL's `record_out` and `array_out`, so the text is exactly what psql shows.

use tokio_postgres::types::Type;

/// An anonymous record or an array of them, taken apart; anything else is a leaf the server
/// prints.
#[derive(Debug, PartialEq)]
pub enum Value<'a> {
    Null,
    /// A value of a type the server can receive and print: `oid` and its binary form.
    Leaf {
        oid: u32,
        raw: &'a [u8],
    },
    Record(Vec<Value<'a>>),
    Array {
        /// Each dimension's length and lower bound.
        dims: Vec<(i32, i32)>,
        /// In row-major order.
        elems: Vec<Value<'a>>,
    },
}

/// The binary form was not what PostgreSQL sends for the type.
#[derive(Debug, thiserror::Error)]
#[error("malformed binary {0} from PostgreSQL")]
pub struct Malformed(&'static str);

/// Whether a column of this type is taken apart here rather than printed by the server.
pub fn is_anonymous(ty: &Type) -> bool {
    *ty == Type::RECORD || *ty == Type::RECORD_ARRAY
}

/// Takes apart a value of type `oid`: anonymous records and arrays of them recursively,
/// anything else as a leaf.
pub fn parse(oid: u32, raw: &[u8]) -> Result<Value<'_>, Malformed> {
    if oid == Type::RECORD.oid() {
        parse_record(raw)
    } else if oid == Type::RECORD_ARRAY.oid() {
        parse_array(raw)
    } else {
        Ok(Value::Leaf { oid, raw })
    }
}

/// `record_send`: the field count, then each field's type oid, length (-1: NULL) and bytes.
fn parse_record(raw: &[u8]) -> Result<Value<'_>, Malformed> {
    let mut r = Reader(raw);
    let n = r.i32("record")?;
    let mut fields = Vec::with_capacity(n.clamp(0, 1600) as usize);
    for _ in 0..n {
        let oid = r.i32("record")? as u32;
        fields.push(match r.value("record")? {
            None => Value::Null,
            Some(bytes) => parse(oid, bytes)?,
        });
    }
    Ok(Value::Record(fields))
}

/// `array_send`: dimensions, a has-nulls flag, the element oid, each dimension's length and
/// lower bound, then each element as length (-1: NULL) and bytes.
fn parse_array(raw: &[u8]) -> Result<Value<'_>, Malformed> {
    let mut r = Reader(raw);
    let ndim = r.i32("array")?;
    let _has_nulls = r.i32("array")?;
    let elem = r.i32("array")? as u32;
    let dims = (0..ndim.clamp(0, 6))
        .map(|_| Ok((r.i32("array")?, r.i32("array")?)))
        .collect::<Result<Vec<_>, Malformed>>()?;
    // Checked: a malformed header must not overflow the count (or the bounds it prints).
    let count = match dims.is_empty() {
        true => Some(0),
        false => dims.iter().try_fold(1i64, |n, (len, lower)| {
            lower.checked_add(*len)?;
            n.checked_mul(i64::from(*len)).filter(|n| *n >= 0)
        }),
    };
    let count = count.ok_or(Malformed("array dimensions"))?;
    let mut elems = Vec::new();
    for _ in 0..count {
        elems.push(match r.value("array")? {
            None => Value::Null,
            Some(bytes) => parse(elem, bytes)?,
        });
    }
    Ok(Value::Array { dims, elems })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, Malformed> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn value(&mut self, what: &'static str) -> Result<Option<&'a [u8]>, Malformed> {
        match self.i32(what)? {
            -1 => Ok(None),
            len if len < 0 => Err(Malformed(what)),
            len => self.take(len as usize, what).map(Some),
        }
    }
}

impl<'a> Value<'a> {
    /// The leaves, in the order [`Value::render`] consumes their printed text.
    pub fn leaves(&self, out: &mut Vec<(u32, &'a [u8])>) {
        match self {
            Value::Null => {}
            Value::Leaf { oid, raw } => out.push((*oid, raw)),
            Value::Record(fields) => fields.iter().for_each(|f| f.leaves(out)),
            Value::Array { elems, .. } => elems.iter().for_each(|e| e.leaves(out)),
        }
    }

    /// The text form, with each leaf's text taken from `printed` in [`Value::leaves`] order.
    /// `None` for a NULL at the top.
    pub fn render(&self, printed: &mut impl Iterator<Item = String>) -> Option<String> {
        match self {
            Value::Null => None,
            Value::Leaf { .. } => Some(printed.next().unwrap_or_default()),
            Value::Record(fields) => {
                let parts: Vec<String> = fields
                    .iter()
                    .map(|f| {
                        f.render(printed)
                            .map(|t| quote_field(&t))
                            .unwrap_or_default()
                    })
                    .collect();
                Some(format!("({})", parts.join(",")))
            }
            Value::Array { dims, elems } => {
                let texts: Vec<String> = elems
                    .iter()
                    .map(|e| match e.render(printed) {
                        Some(t) => quote_element(&t),
                        None => "NULL".into(),
                    })
                    .collect();
                Some(render_array(dims, &texts))
            }
        }
    }
}

/// `array_out`: nested braces per dimension, with `[lower:upper]=` in front when a lower
/// bound is not 1.
fn render_array(dims: &[(i32, i32)], texts: &[String]) -> String {
    if dims.is_empty() || texts.is_empty() {
        return "{}".into();
    }
    let mut out = String::new();
    if dims.iter().any(|(_, lower)| *lower != 1) {
        for (len, lower) in dims {
            out.push_str(&format!("[{}:{}]", lower, lower + len - 1));
        }
        out.push('=');
    }
    nest(
        &dims
            .iter()
            .map(|(len, _)| *len as usize)
            .collect::<Vec<_>>(),
        texts,
        &mut out,
    );
    out
}

fn nest(lens: &[usize], texts: &[String], out: &mut String) {
    out.push('{');
    match lens {
        [] | [_] => out.push_str(&texts.join(",")),
        [_, inner @ ..] => {
            let step = inner.iter().product::<usize>().max(1);
            for (i, chunk) in texts.chunks(step).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                nest(inner, chunk, out);
            }
        }
    }
    out.push('}');
}

/// `record_out`'s quoting of one field: quoted when empty or holding `"\(),` or space, with
/// `"` and `\` doubled.
fn quote_field(text: &str) -> String {
    let special = |c: char| matches!(c, '"' | '\\' | '(' | ')' | ',');
    quote(text, text.is_empty(), special, |c| c)
}

/// `array_out`'s quoting of one element: quoted when empty, `NULL` in any case, or holding
/// `{},"\` or space, with `"` and `\` escaped by a backslash.
fn quote_element(text: &str) -> String {
    let special = |c: char| matches!(c, '{' | '}' | ',' | '"' | '\\');
    let forced = text.is_empty() || text.eq_ignore_ascii_case("NULL");
    quote(text, forced, special, |_| '\\')
}

/// `text` in double quotes when `forced` or when it holds a `special` character or space, with
/// `"` and `\` preceded by `escape` of themselves.
fn quote(
    text: &str,
    forced: bool,
    special: impl Fn(char) -> bool,
    escape: impl Fn(char) -> char,
) -> String {
    if !forced && !text.chars().any(|c| special(c) || c.is_ascii_whitespace()) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if matches!(c, '"' | '\\') {
            out.push(escape(c));
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever bytes come as a record or an array of them, parsing never panics, and
        /// what parses renders.
        #[test]
        fn any_bytes_parse_or_fail_cleanly(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            for oid in [Type::RECORD.oid(), Type::RECORD_ARRAY.oid()] {
                if let Ok(value) = parse(oid, &raw) {
                    let mut leaves = Vec::new();
                    value.leaves(&mut leaves);
                    let mut printed = leaves.iter().map(|_| "x".to_string());
                    value.render(&mut printed);
                }
            }
        }

        /// Any text quotes so that PostgreSQL's readers give it back unchanged: doubled
        /// quotes and backslashes in a record field, backslash escapes in an array element.
        #[test]
        fn quoting_reads_back_as_the_text(text in "(?s).{0,40}") {
            let unquote = |quoted: &str, escaped: fn(char, Option<char>) -> bool| -> String {
                let Some(inner) = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')) else {
                    return quoted.to_string();
                };
                let (mut out, mut chars) = (String::new(), inner.chars().peekable());
                while let Some(c) = chars.next() {
                    if escaped(c, chars.peek().copied()) {
                        out.push(chars.next().unwrap());
                    } else {
                        out.push(c);
                    }
                }
                out
            };
            let doubled = |c: char, next: Option<char>| matches!(c, '"' | '\\') && next == Some(c);
            let backslashed = |c: char, _: Option<char>| c == '\\';
            proptest::prop_assert_eq!(unquote(&quote_field(&text), doubled), text.clone());
            proptest::prop_assert_eq!(unquote(&quote_element(&text), backslashed), text);
        }
    }

    const INT4: u32 = 23;
    const TEXT: u32 = 25;

    fn record(fields: &[(u32, Option<&[u8]>)]) -> Vec<u8> {
        let mut out = (fields.len() as i32).to_be_bytes().to_vec();
        for (oid, value) in fields {
            out.extend(oid.to_be_bytes());
            match value {
                None => out.extend((-1i32).to_be_bytes()),
                Some(v) => {
                    out.extend((v.len() as i32).to_be_bytes());
                    out.extend(*v);
                }
            }
        }
        out
    }

    fn array_of_records(dims: &[(i32, i32)], elems: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut out = (dims.len() as i32).to_be_bytes().to_vec();
        out.extend(0i32.to_be_bytes());
        out.extend(Type::RECORD.oid().to_be_bytes());
        for (len, lower) in dims {
            out.extend(len.to_be_bytes());
            out.extend(lower.to_be_bytes());
        }
        for e in elems {
            match e {
                None => out.extend((-1i32).to_be_bytes()),
                Some(v) => {
                    out.extend((v.len() as i32).to_be_bytes());
                    out.extend(v);
                }
            }
        }
        out
    }

    /// Renders with each leaf "printed" as its own bytes, as text.
    fn text_of(value: &Value) -> Option<String> {
        let mut leaves = Vec::new();
        value.leaves(&mut leaves);
        let mut printed = leaves
            .into_iter()
            .map(|(_, raw)| String::from_utf8(raw.to_vec()).unwrap());
        value.render(&mut printed)
    }

    #[test]
    fn a_record_prints_as_record_out_does() {
        let raw = record(&[
            (TEXT, Some(b"1")),
            (TEXT, Some(b"a b")),
            (TEXT, None),
            (TEXT, Some(b"")),
            (TEXT, Some(b"say \"hi\" \\o/")),
        ]);

        let value = parse(Type::RECORD.oid(), &raw).unwrap();

        assert_eq!(
            text_of(&value).unwrap(),
            r#"(1,"a b",,"","say ""hi"" \\o/")"#
        );
    }

    #[test]
    fn nested_records_and_arrays_of_records_print_as_psql_shows_them() {
        let inner = record(&[(TEXT, Some(b"x,y")), (TEXT, Some(b"2"))]);
        let outer = record(&[(Type::RECORD.oid(), Some(&inner)), (INT4, Some(b"7"))]);
        let array = array_of_records(&[(3, 1)], &[Some(inner.clone()), None, Some(outer.clone())]);

        let value = parse(Type::RECORD_ARRAY.oid(), &array).unwrap();

        assert_eq!(
            text_of(&value).unwrap(),
            r#"{"(\"x,y\",2)",NULL,"(\"(\"\"x,y\"\",2)\",7)"}"#
        );
    }

    #[test]
    fn array_shapes_follow_array_out() {
        let r = |s: &'static [u8]| Some(record(&[(TEXT, Some(s))]));
        let two_by_two = array_of_records(&[(2, 1), (2, 1)], &[r(b"a"), r(b"b"), r(b"c"), r(b"d")]);
        let from_zero = array_of_records(&[(1, 0)], &[r(b"a")]);
        let empty = array_of_records(&[], &[]);

        let text = |raw: &[u8]| text_of(&parse(Type::RECORD_ARRAY.oid(), raw).unwrap()).unwrap();

        assert_eq!(text(&two_by_two), "{{(a),(b)},{(c),(d)}}");
        assert_eq!(text(&from_zero), "[0:0]={(a)}");
        assert_eq!(text(&empty), "{}");
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let raw = record(&[(TEXT, Some(b"abc"))]);
        for cut in 0..raw.len() {
            assert!(
                parse(Type::RECORD.oid(), &raw[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let negative = [0, 0, 0, 1, 0, 0, 0, 25, 0xff, 0xff, 0xff, 0xfe];
        assert!(parse(Type::RECORD.oid(), &negative).is_err());
    }
}
