//! The secret that addresses a one-phase commit's marker.
//!
//! A participant's clients run their SQL as the participant's own PostgreSQL role, so anything
//! that role can name in the database, they can name too. A marker found by its gid alone could
//! be forged (a `true` row makes a lost commit look committed) or planted in advance (a `false`
//! row aborts someone else's transaction). So a marker is found by a secret instead: the
//! coordinator derives it from a key only its log holds (`coordinator::marker_key`), sends it
//! with every CommitOnePhase of the transaction, and the database keeps only its SHA-256, in a
//! table that only `SECURITY DEFINER` functions write (`participant::marker`). A client that
//! has read every row still cannot produce the secret of any of them.

use std::fmt;

/// The shortest and longest secret a participant accepts.
pub const SECRET_BYTES: std::ops::RangeInclusive<usize> = 16..=64;

/// A one-phase transaction's marker secret, as it travels in `CommitOnePhaseRequest`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MarkerSecret(Vec<u8>);

impl MarkerSecret {
    /// Refuses a secret too short to be unguessable (or absurdly long).
    pub fn new(bytes: Vec<u8>) -> Result<Self, InvalidMarkerSecret> {
        if SECRET_BYTES.contains(&bytes.len()) {
            Ok(MarkerSecret(bytes))
        } else {
            Err(InvalidMarkerSecret(bytes.len()))
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Never printed: a log line must not hand a secret to whoever reads the logs.
impl fmt::Debug for MarkerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MarkerSecret(<{} bytes>)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the marker secret is {0} bytes; a one-phase marker secret is {min} to {max} bytes (a coordinator derives it from its log's marker key)",
    min = SECRET_BYTES.start(),
    max = SECRET_BYTES.end()
)]
pub struct InvalidMarkerSecret(pub usize);

/// A malformed secret in a request is the caller's mistake.
impl From<InvalidMarkerSecret> for tonic::Status {
    fn from(e: InvalidMarkerSecret) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_secret_is_refused_and_none_is_ever_printed() {
        assert_eq!(MarkerSecret::new(vec![]), Err(InvalidMarkerSecret(0)));
        assert!(MarkerSecret::new(vec![7; 15]).is_err());
        assert!(MarkerSecret::new(vec![7; 65]).is_err());
        let secret = MarkerSecret::new(vec![0xab; 32]).unwrap();
        assert_eq!(format!("{secret:?}"), "MarkerSecret(<32 bytes>)");
    }
}
