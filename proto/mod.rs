//! The wire: the code generated from `proto/twopc/v1/twopc.proto`, its descriptor set (for
//! server reflection), and the transaction id both sides of the protocol parse from it.

mod txn_id;

pub use txn_id::{InvalidTxnId, TxnId};

tonic::include_proto!("twopc.v1");

/// The encoded descriptor set of every `twopc.v1` file, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/twopc_descriptor.bin"));
