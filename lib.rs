//! twopc: a two-phase-commit coordinator for PostgreSQL, reached over gRPC.
//!
//! The two sides of the protocol live in their own trees:
//! - [`coordinator`]: begins transactions, logs commit decisions in sled, drives phase 1 and 2.
//! - [`participant`]: runs a client's SQL inside a branch on one PostgreSQL database and
//!   prepares, commits and rolls it back on the coordinator's word.
//!
//! [`proto`] is the wire: the generated gRPC code and the transaction id both sides share.

pub mod coordinator;
pub mod failpoints;
pub mod participant;
pub mod proto;
pub mod signal;
