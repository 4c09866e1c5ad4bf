//! The names processes give themselves (coordinator ids and participant ids), and the names
//! clients give sagas and their steps.
//!
//! One rule, checked where a name enters (a flag, a request, a data dir), because both kinds
//! travel further than the request that carries them: a coordinator id is spliced into every
//! PostgreSQL gid (`PREPARE TRANSACTION` takes no bind parameter), and a participant id is a
//! key of the coordinator's durable registry. Participant ids may also contain `.` (host-like
//! names); coordinator ids may not, so a gid always splits unambiguously.

/// A name that breaks the rule, with the rule, so the message says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: use 1-{MAX_LEN} characters from {alphabet}")]
pub struct InvalidName {
    pub kind: &'static str,
    pub value: String,
    alphabet: &'static str,
}

/// The longest name: a gid (`twopc:<coordinator id>:<txn id>`) must stay under PostgreSQL's
/// 200 bytes.
pub const MAX_LEN: usize = 64;

/// Checks a coordinator id: it goes into PostgreSQL gids, spliced into SQL text.
pub fn check_coordinator_id(id: &str) -> Result<(), InvalidName> {
    check("coordinator id", "A-Z a-z 0-9 _ -", id, |_| false)
}

/// Checks a participant id (the coordinator's registry key, and a label in logs and metrics).
pub fn check_participant_id(id: &str) -> Result<(), InvalidName> {
    check("participant_id", "A-Z a-z 0-9 _ - .", id, |c| c == b'.')
}

/// Checks a saga id or a step name (a key of the log, and shown in every tool).
pub fn check_saga_name(kind: &'static str, name: &str) -> Result<(), InvalidName> {
    check(kind, "A-Z a-z 0-9 _ - . :", name, |c| {
        c == b'.' || c == b':'
    })
}

fn check(
    kind: &'static str,
    alphabet: &'static str,
    value: &str,
    also: impl Fn(u8) -> bool,
) -> Result<(), InvalidName> {
    let ok = !value.is_empty()
        && value.len() <= MAX_LEN
        && value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || also(c));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            kind,
            value: super::shown(value),
            alphabet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_ids_refuse_what_could_break_out_of_a_gid() {
        for bad in ["", "a'b", "a b", "a:b", "a.b", &"c".repeat(65)] {
            assert!(check_coordinator_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_coordinator_id(&"c".repeat(64)).is_ok());
        assert_eq!(
            check_coordinator_id("x'; --").unwrap_err().to_string(),
            "invalid coordinator id \"x'; --\": use 1-64 characters from A-Z a-z 0-9 _ -"
        );
    }

    #[test]
    fn participant_ids_may_also_hold_dots() {
        assert!(check_participant_id("db1.eu-west").is_ok());
        assert!(check_participant_id("p 1").is_err());
        assert!(check_participant_id("").is_err());
    }
}
