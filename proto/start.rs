//! What a client that chose its own txn id sends with its statements, and a participant with
//! its enlistment, so that the transaction's first enlistment can create it (docs/PROTOCOL.md
//! §12). Begin's clients send none of it: their transaction exists before any statement.

/// The epoch the client learned, and Begin's two arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Start {
    /// The coordinator's epoch (GetEpoch); never 0.
    pub epoch: u64,
    /// As Begin's: 0 means the coordinator's default.
    pub timeout_ms: u32,
    pub label: String,
}

impl Start {
    /// From a request's three fields; `None` when `epoch` is 0 (the transaction came from Begin).
    pub fn from_fields(epoch: u64, timeout_ms: u32, label: &str) -> Option<Start> {
        (epoch != 0).then(|| Start {
            epoch,
            timeout_ms,
            label: label.to_string(),
        })
    }
}
