//! What every twopc process shares, whatever side of the protocol it runs: how it stops
//! ([`signal`]), where it can be made to crash on purpose ([`failpoints`]), how it reports
//! (logs and metrics, [`telemetry`]), and how it is configured beyond its flags ([`config`]).

pub mod config;
pub mod failpoints;
pub mod signal;
pub mod telemetry;
