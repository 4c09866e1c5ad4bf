//! The wire: the code generated from `proto/twopc/v1/twopc.proto`, its descriptor set (for
//! server reflection), and what both sides of the protocol read from it: the transaction id,
//! the names coordinators and participants go by ([`names`]), a branch's [`vote`], and the
//! secret that addresses a one-phase commit's marker ([`marker`]).

pub mod marker;
pub mod names;
mod start;
mod txn_id;
pub mod vote;

pub use start::Start;
pub use txn_id::{InvalidTxnId, TxnId};

tonic::include_proto!("twopc.v1");

/// The encoded descriptor set of every `twopc.v1` file, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/twopc_descriptor.bin"));

/// Metadata on a `stale epoch` refusal: the coordinator's current epoch, so a client learns it
/// without another call (docs/PROTOCOL.md §12).
pub const EPOCH_METADATA: &str = "twopc-epoch";

/// Metadata on every failed Execute: the participant's id, which a client names at Commit as
/// it names `ExecuteResponse.participant_id` after a success.
pub const PARTICIPANT_ID_METADATA: &str = "twopc-participant-id";

/// Metadata on a saga's gRPC step (docs/SAGAS.md §2): which saga, which step, which half
/// (`action` or `compensate`), and the barrier secrets a service keys its barrier rows by
/// (`client::barrier`): the action's, and for a compensation its own.
pub const SAGA_ID_METADATA: &str = "twopc-saga-id";
pub const SAGA_STEP_METADATA: &str = "twopc-saga-step";
pub const SAGA_OP_METADATA: &str = "twopc-saga-op";
pub const SAGA_BARRIER_METADATA: &str = "twopc-saga-barrier-bin";
pub const SAGA_COMPENSATION_METADATA: &str = "twopc-saga-compensation-bin";

/// A client's input as an error message quotes it: at most its first 48 characters. A status
/// message travels in an HTTP/2 header, and echoing a megabyte back would fail the reply.
pub fn shown(input: &str) -> String {
    const SHOWN: usize = 48;
    match input.char_indices().nth(SHOWN) {
        None => input.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &input[..cut], input.len()),
    }
}

/// Short constructors for the values clients send most.
impl Value {
    pub fn int(v: i64) -> Value {
        Value {
            kind: Some(value::Kind::IntValue(v)),
        }
    }

    pub fn text(v: impl Into<String>) -> Value {
        Value {
            kind: Some(value::Kind::TextValue(v.into())),
        }
    }

    pub fn null() -> Value {
        Value {
            kind: Some(value::Kind::NullValue(true)),
        }
    }
}
