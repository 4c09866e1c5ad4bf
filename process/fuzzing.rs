//! What the fuzz-style property tests of both services share (`coordinator/fuzz.rs`,
//! `participant/fuzz.rs`): arbitrary text, the statuses a client can act on, and the loop that
//! sends one case's calls, each within a bound, and then asks what was left behind.

use proptest::prelude::*;
use std::fmt::Debug;
use std::time::Duration;
use tonic::{Code, Status};

/// How long one call may take: nothing in these tests waits on more than in-memory fakes and
/// the short protocol timeouts they configure.
pub const CALL_BOUND: Duration = Duration::from_secs(5);

/// Text as a stranger sends it: mostly short, sometimes long, any Unicode, sometimes empty.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,24}",
        1 => "(?s).{0,3000}",
        1 => Just(String::new()),
    ]
}

/// Statuses a client can act on. INTERNAL, UNKNOWN and the like would mean a bug or a panic.
pub fn actionable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::PermissionDenied
            | Code::Unavailable
            | Code::Aborted
    )
}

/// A service under test, and what one case sends it.
pub trait Target {
    type Call: Debug;
    /// Makes one call; its status if it failed.
    fn call(&mut self, call: &Self::Call) -> impl Future<Output = Result<(), Status>>;
    /// Ends everything the case started, and says what is left that should not be.
    fn leftovers(&self) -> impl Future<Output = Option<String>>;
}

/// Runs one case on a runtime of its own: every call answers within [`CALL_BOUND`] with a
/// value or an actionable status, and nothing is left behind.
pub fn run_case<T: Target>(target: impl FnOnce() -> T, calls: &[T::Call]) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut target = target();
        for call in calls {
            match tokio::time::timeout(CALL_BOUND, target.call(call)).await {
                Err(_) => return Err(format!("{call:?} did not answer within {CALL_BOUND:?}")),
                Ok(Err(status)) if !actionable(&status) => {
                    return Err(format!("{call:?} answered {status:?}"));
                }
                Ok(_) => {}
            }
        }
        match target.leftovers().await {
            Some(left) => Err(left),
            None => Ok(()),
        }
    })
}
