//! What tests, the demo, the crash harness and the benchmarks need around the library: a whole
//! system from one builder ([`system`]), the bank they move money in and its invariants
//! ([`bank`]), bounded waits ([`wait`]), throwaway PostgreSQL clusters ([`cluster`]) and etcd
//! clusters ([`etcd`]), a throwaway certificate authority for TLS ([`certs`]) and bearer
//! tokens for each role ([`tokens`]). Behind the
//! `testkit` feature, so a service that embeds twopc does not build it. The in-memory fakes of
//! the protocol's peers live beside the traits they implement (`coordinator::participants::fake`,
//! `participant::fake`) under the same feature.

pub mod bank;
pub mod certs;
pub mod cluster;
pub mod etcd;
pub mod system;
pub mod tokens;
pub mod wait;

pub use certs::TestPki;
pub use cluster::{PgCluster, Settings};
pub use etcd::EtcdCluster;
pub use system::System;
pub use tokens::TestTokens;
pub use wait::eventually;

/// A loopback port nobody listens on now, for a server started later (PostgreSQL, etcd, a
/// crash harness's processes). Another process may take it in between: callers that can,
/// retry on a clash.
pub fn free_port() -> anyhow::Result<u16> {
    use anyhow::Context;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("probing for a free port")?;
    Ok(listener.local_addr()?.port())
}
