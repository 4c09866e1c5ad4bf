//! PostgreSQL global transaction ids (gids) for our branches: `twopc:<coordinator-id>:<txn-id>`.
//!
//! The gid names its owner, so many coordinators can share a server, a DBA reading
//! `pg_prepared_xacts` can tell whose a row is, and recovery can find the coordinator to ask.
//! `PREPARE TRANSACTION` takes no bind parameter, so the gid is spliced into SQL text: it is
//! built only from validated characters (the coordinator id's alphabet and a UUID's).

use crate::proto::TxnId;
use crate::proto::names::{self, InvalidName};
use std::fmt;

const PREFIX: &str = "twopc:";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Gid {
    pub coordinator_id: String,
    pub txn: TxnId,
}

impl Gid {
    pub fn new(coordinator_id: &str, txn: TxnId) -> Result<Self, InvalidName> {
        names::check_coordinator_id(coordinator_id)?;
        Ok(Gid {
            coordinator_id: coordinator_id.to_string(),
            txn,
        })
    }

    /// Reads a gid from `pg_prepared_xacts`; `None` for anyone else's.
    pub fn parse(gid: &str) -> Option<Self> {
        let rest = gid.strip_prefix(PREFIX)?;
        let (coordinator, txn) = rest.rsplit_once(':')?;
        Gid::new(coordinator, txn.parse().ok()?).ok()
    }

    /// The gid as a quoted SQL literal. Safe by construction: no quote can be in it.
    pub fn literal(&self) -> String {
        format!("'{self}'")
    }

    /// The `LIKE` pattern matching every gid of ours.
    pub fn like_all() -> &'static str {
        "twopc:%"
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}:{}", self.coordinator_id, self.txn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_stays_short() {
        let gid = Gid::new(&"c".repeat(64), TxnId::generate()).unwrap();
        let text = gid.to_string();
        assert!(text.len() < 200, "PostgreSQL caps gids at 200 bytes");
        assert_eq!(Gid::parse(&text), Some(gid));
    }

    #[test]
    fn refuses_what_could_break_out_of_the_literal() {
        for bad in ["", "a'b", "a b", "a:b", &"c".repeat(65)] {
            assert!(
                Gid::new(bad, TxnId::generate()).is_err(),
                "{bad:?} accepted"
            );
        }
        assert_eq!(Gid::parse("someone-else's"), None);
        assert_eq!(Gid::parse("twopc:c1:not-a-uuid"), None);
    }
}
