//! What tests, the demo and the benchmarks need around the library: throwaway PostgreSQL
//! clusters ([`cluster`]) and etcd clusters ([`etcd`]), a throwaway certificate authority for TLS ([`certs`]) and bearer
//! tokens for each role ([`tokens`]). Behind the
//! `testkit` feature, so a service that embeds twopc does not build it. The in-memory fakes of
//! the protocol's peers live beside the traits they implement (`coordinator::participants::fake`,
//! `participant::fake`) under the same feature.

pub mod certs;
pub mod cluster;
pub mod etcd;
pub mod tokens;

pub use certs::TestPki;
pub use cluster::{PgCluster, Settings};
pub use etcd::EtcdCluster;
pub use tokens::TestTokens;
