//! twopc: a two-phase-commit coordinator for PostgreSQL, reached over gRPC.
//!
//! The two sides of the protocol live in their own trees:
//! - [`coordinator`]: begins transactions, logs commit decisions in sled, drives phase 1 and 2.
//! - [`participant`]: runs a client's SQL inside a branch on one PostgreSQL database and
//!   prepares, commits and rolls it back on the coordinator's word.
//!
//! [`client`] is how a service uses them: `transact`, an ambient transaction shared by nested
//! calls and carried across gRPC calls.
//!
//! [`proto`] is the wire: the generated gRPC code and the transaction id both sides share.
//! [`process`] is what every process shares: clock, signals, failpoints, logs and metrics, config.
//! `testkit` (feature `testkit`) makes throwaway PostgreSQL clusters for tests and tools.
//!
//! The binaries (`bin/`) are thin: flags in, `run(listener, config, shutdown)` out. See
//! docs/ARCHITECTURE.md for where each rule of the protocol lives.

pub mod client;
pub mod coordinator;
pub mod participant;
pub mod process;
pub mod proto;
#[cfg(feature = "testkit")]
pub mod testkit;
