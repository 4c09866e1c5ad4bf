//! Every end-to-end scenario, in one test binary: each module is one file of scenarios that
//! used to be a binary of its own (tests/e2e/<name>.rs), all sharing [`support`]. One binary
//! links once: seventeen did it seventeen times (issue 23).
//!
//! `cargo test --features testing --test e2e <module>::` runs one file's scenarios, e.g.
//! `crash::` for the crash harness's deterministic passes.

mod support;

mod abort;
mod bad_input;
mod bank;
mod client;
mod commit;
mod contract;
mod crash;
mod ctl;
mod deadlock;
mod demo;
mod embedded;
mod grpcurl;
mod ha;
mod limits;
mod ops;
mod protocol_state;
mod sagas;
mod security;
mod services;
