//! Global transaction ids.
//!
//! A txn id is a UUIDv7: unique without coordination, and ordered by creation time, so the
//! coordinator's log keeps transactions in the order they began and lists newest first cheaply.
//! Its text form (lowercase, hyphenated) is ASCII from a fixed alphabet, which matters because it
//! is spliced into `PREPARE TRANSACTION '<gid>'`, a statement that takes no bind parameter.

use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct TxnId(Uuid);

#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "malformed txn id {0:?}: expected a UUID such as 0192c6c4-5b1e-7f3a-9d2e-8c1b2a3d4e5f, as returned by Begin"
)]
pub struct InvalidTxnId(pub String);

impl TxnId {
    /// A fresh id, ordered after every id this process made before.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// When it was made (Unix ms), from its UUIDv7 timestamp; `None` for an id that is not one.
    pub fn created_ms(&self) -> Option<i64> {
        let (secs, nanos) = self.0.get_timestamp()?.to_unix();
        Some(secs as i64 * 1000 + i64::from(nanos / 1_000_000))
    }

    /// Made as a UUIDv7, whose time [`TxnId::created_ms`] reads.
    pub fn is_v7(&self) -> bool {
        self.0.get_version_num() == 7
    }

    /// The 16 bytes the log uses as key; they sort like the ids.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Uuid::from_slice(bytes).ok().map(Self)
    }

    /// A W3C `traceparent` for a call made on this transaction's behalf. The trace id *is* the
    /// txn id (both are 16 bytes), so every log line and every tracing backend groups the
    /// coordinator's and the participants' work on one transaction under one trace.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{:016x}-01",
            self.0.simple(),
            rand::random::<u64>() | 1
        )
    }
}

impl FromStr for TxnId {
    type Err = InvalidTxnId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Only the hyphenated form: one spelling per id, so gids built from it are unique.
        if s.len() != 36 {
            return Err(InvalidTxnId(super::shown(s)));
        }
        Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| InvalidTxnId(super::shown(s)))
    }
}

/// A malformed id in a request is the caller's mistake, the same on every service.
impl From<InvalidTxnId> for tonic::Status {
    fn from(e: InvalidTxnId) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any string parses as an id or fails with a short message; never a panic.
        #[test]
        fn any_string_parses_or_fails_short(s in "(?s).{0,100}") {
            if let Err(e) = s.parse::<TxnId>() {
                proptest::prop_assert!(e.to_string().len() < 400);
            }
        }
    }

    #[test]
    fn a_huge_malformed_id_is_quoted_short() {
        let huge = "x".repeat(1 << 20);

        let message = huge.parse::<TxnId>().unwrap_err().to_string();

        assert!(message.len() < 300, "{} bytes", message.len());
        assert!(message.contains("(1048576 bytes)"), "{message}");
    }

    #[test]
    fn round_trips_through_text_and_bytes() {
        let id = TxnId::generate();
        assert_eq!(id.to_string().parse::<TxnId>().unwrap(), id);
        assert_eq!(TxnId::from_bytes(id.as_bytes()), Some(id));
    }

    #[test]
    fn later_ids_sort_after_earlier_ones() {
        let a = TxnId::generate();
        let b = TxnId::generate();
        assert!(a.as_bytes() < b.as_bytes());
    }

    #[test]
    fn rejects_anything_but_a_hyphenated_uuid() {
        for bad in [
            "",
            "42",
            "x'; DROP TABLE t; --",
            "0192c6c45b1e7f3a9d2e8c1b2a3d4e5f",
        ] {
            assert!(bad.parse::<TxnId>().is_err(), "{bad:?} parsed");
        }
        let upper = TxnId::generate().to_string().to_uppercase();
        assert_eq!(
            upper.parse::<TxnId>().unwrap().to_string(),
            upper.to_lowercase()
        );
    }
}
