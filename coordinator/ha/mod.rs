//! Coordinator replicas on etcd (docs/HA.md): several processes, one coordinator. They share
//! the log on etcd (`log/etcd_log.rs`); [`leader`] elects the one that serves and fences the
//! others' writes, [`standby`] sends callers of the others to it, and `replica.rs` runs one
//! replica through its terms.

pub mod leader;
pub(super) mod replica;
pub mod standby;
