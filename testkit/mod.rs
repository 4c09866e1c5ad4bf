//! What tests, the demo and the benchmarks need around the library: throwaway PostgreSQL
//! clusters ([`cluster`]) and a throwaway certificate authority for TLS ([`certs`]). Behind the
//! `testkit` feature, so a service that embeds twopc does not build it. The in-memory fakes of
//! the protocol's peers live beside the traits they implement (`coordinator::participants::fake`,
//! `participant::fake`) under the same feature.

pub mod certs;
pub mod cluster;

pub use certs::TestPki;
pub use cluster::{PgCluster, Settings};
