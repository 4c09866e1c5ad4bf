//! The coordinator's marker key: where one-phase markers' secrets come from.
//!
//! A one-phase commit's marker is found in the participant's database by a secret, not by its
//! gid, so that a client's SQL (which runs as the participant's role) can neither forge nor
//! plant one (`proto::marker` says why). The secret must be the same on every CommitOnePhase
//! of a transaction, across coordinator restarts and on every replica, and nobody but the
//! coordinator may be able to compute it. So it is an HMAC of the transaction under a random
//! key created with the log and kept in it (`meta` in sled, `meta/marker_key` in etcd), next to
//! the coordinator's id: it is as durable as the decisions it serves, and no extra record per
//! transaction is needed.

use crate::proto::TxnId;
use crate::proto::marker::MarkerSecret;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Bytes of key, and of each secret derived from it.
pub const KEY_BYTES: usize = 32;

/// The coordinator's marker key.
#[derive(Clone)]
pub struct MarkerKey {
    key: hmac::Key,
    /// The raw key, for storing it.
    bytes: [u8; KEY_BYTES],
}

impl MarkerKey {
    /// A fresh random key, for a new log.
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_BYTES];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the operating system's random number generator failed");
        Self::from_array(bytes)
    }

    /// The key a log stored; `None` if it is not [`KEY_BYTES`] long (a damaged log).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self::from_array(bytes.try_into().ok()?))
    }

    fn from_array(bytes: [u8; KEY_BYTES]) -> Self {
        MarkerKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
            bytes,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The marker secret of `txn` of the coordinator `coordinator_id`.
    pub fn secret(&self, coordinator_id: &str, txn: TxnId) -> MarkerSecret {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"twopc one-phase marker\0");
        ctx.update(coordinator_id.as_bytes());
        ctx.update(b"\0");
        ctx.update(txn.to_string().as_bytes());
        MarkerSecret::new(ctx.sign().as_ref().to_vec())
            .expect("an HMAC-SHA256 tag is 32 bytes, a valid secret length")
    }
}

impl MarkerKey {
    /// The barrier secret of one half (`op`: `action` or `compensate`) of a saga's step
    /// (docs/SAGAS.md §4): the same on every send of it, by any replica, and out of reach of
    /// anyone without the key, who could otherwise fence a step off or make it a no-op.
    pub fn barrier_secret(&self, saga_id: &str, step: &str, op: &str) -> MarkerSecret {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"twopc saga barrier\0");
        for part in [saga_id, step, op] {
            ctx.update(part.as_bytes());
            ctx.update(b"\0");
        }
        MarkerSecret::new(ctx.sign().as_ref().to_vec())
            .expect("an HMAC-SHA256 tag is 32 bytes, a valid secret length")
    }
}

/// Never printed.
impl std::fmt::Debug for MarkerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MarkerKey(<secret>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_has_one_secret_under_a_key_and_another_under_any_other() {
        let (key, txn) = (MarkerKey::generate(), TxnId::generate());
        let stored = MarkerKey::from_bytes(key.as_bytes()).unwrap();
        assert_eq!(key.secret("c1", txn), stored.secret("c1", txn));
        assert_ne!(key.secret("c1", txn), key.secret("c1", TxnId::generate()));
        assert_ne!(key.secret("c1", txn), key.secret("c2", txn));
        assert_ne!(
            key.secret("c1", txn),
            MarkerKey::generate().secret("c1", txn)
        );
        assert!(MarkerKey::from_bytes(&[1, 2, 3]).is_none());
    }

    #[test]
    fn each_half_of_each_step_has_a_secret_of_its_own() {
        let key = MarkerKey::generate();
        let s = |saga, step, op| key.barrier_secret(saga, step, op);
        assert_eq!(s("o-1", "pay", "action"), s("o-1", "pay", "action"));
        assert_ne!(s("o-1", "pay", "action"), s("o-1", "pay", "compensate"));
        assert_ne!(s("o-1", "pay", "action"), s("o-2", "pay", "action"));
        // The separator keeps ("o-1", "pay") apart from ("o-1p", "ay").
        assert_ne!(s("o-1", "pay", "action"), s("o-1p", "ay", "action"));
    }
}
