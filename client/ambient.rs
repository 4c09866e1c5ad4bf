//! The ambient transaction: the one the current task works in, as a local transaction is the
//! one its connection is in. [`transact`] begins one, or joins the one already there, so code
//! that calls other code (or other services, through [`super::propagation`]) shares one global
//! transaction without passing its id around.
//!
//! The context is a tokio task-local: it follows the task through every `.await`, but not into
//! tasks it spawns; wrap a spawned future in [`within`] to carry it there.

use super::{Client, Error, Transaction};
use std::future::Future;
use std::time::Duration;

tokio::task_local! {
    static AMBIENT: Transaction;
}

/// The ambient transaction of the current task, if it is inside one.
pub fn current() -> Option<Transaction> {
    AMBIENT.try_with(Transaction::clone).ok()
}

/// Runs `fut` with `tx` as its ambient transaction (for a spawned task, or a server handler
/// joining a transaction begun elsewhere).
pub async fn within<F: Future>(tx: Transaction, fut: F) -> F::Output {
    AMBIENT.scope(tx, fut).await
}

/// How [`transact_with`] begins a transaction of its own.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The transaction's timeout; `None`: the coordinator's default (30 s).
    pub timeout: Option<Duration>,
    /// Shown by `twopcctl list`.
    pub label: String,
    /// How many times to run the work again when the transaction was chosen as a
    /// deadlock's victim (SQLSTATE 40P01); 0 by default. Only a transaction begun here is
    /// retried: a joined one belongs to an outer `transact`, which decides.
    pub deadlock_retries: u32,
}

/// Runs `work` in a global transaction: the ambient one if the task is already inside one
/// (nested calls share it, and only the outermost commits), else a new one, which it commits
/// when `work` returns `Ok` and aborts when it returns `Err` or panics. A nested `transact`
/// whose work fails aborts the shared transaction at once, so the outermost cannot commit
/// part of it. `work` may be called more than once when [`Options::deadlock_retries`] allows.
///
/// ```no_run
/// # async fn example(client: twopc::client::Client) -> Result<i64, twopc::client::Error> {
/// use twopc::client::transact;
/// let balance = transact(&client, |tx| async move {
///     let rows = tx
///         .execute("http://127.0.0.1:50061", "SELECT bal FROM acct WHERE id = $1", &[&1i64])
///         .await?;
///     rows.scalar::<i64>()
/// })
/// .await?;
/// # Ok(balance)
/// # }
/// ```
pub async fn transact<T, E, F, Fut>(client: &Client, work: F) -> Result<T, E>
where
    F: FnMut(Transaction) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: From<Error> + std::fmt::Display,
{
    transact_with(client, Options::default(), work).await
}

/// [`transact`], with the timeout, label and deadlock retries of a transaction it begins.
pub async fn transact_with<T, E, F, Fut>(
    client: &Client,
    options: Options,
    mut work: F,
) -> Result<T, E>
where
    F: FnMut(Transaction) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: From<Error> + std::fmt::Display,
{
    if let Some(tx) = current() {
        return nested(tx, work).await;
    }
    let mut retries = options.deadlock_retries;
    loop {
        let tx = client.begin(options.timeout, &options.label).await?;
        let result = match run(tx.clone(), &mut work).await {
            Ok(value) => tx.commit().await.map(|_| value).map_err(E::from),
            Err(e) => {
                let _ = tx.abort(&format!("transact: {e}")).await;
                Err(e)
            }
        };
        match result {
            Err(e) if retries > 0 && deadlock(&e) => {
                retries -= 1;
                tracing::debug!(txn_id = %tx.id(), "a deadlock's victim: running the work again");
            }
            result => return result,
        }
    }
}

/// Inside an ambient transaction: the work's failure aborts it, for everyone sharing it.
async fn nested<T, E, F, Fut>(tx: Transaction, mut work: F) -> Result<T, E>
where
    F: FnMut(Transaction) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let result = run(tx.clone(), &mut work).await;
    if let Err(e) = &result {
        let _ = super::abort(
            tx.client(),
            tx.id(),
            tx.start(),
            &format!("a nested transact failed: {e}"),
        )
        .await;
    }
    result
}

/// The work, with `tx` ambient; a panic aborts the transaction first, then goes on unwinding.
async fn run<T, E, F, Fut>(tx: Transaction, work: &mut F) -> Result<T, E>
where
    F: FnMut(Transaction) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    use futures::FutureExt;
    let fut = std::panic::AssertUnwindSafe(within(tx.clone(), work(tx.clone())));
    match fut.catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let _ = super::abort(tx.client(), tx.id(), tx.start(), "the work panicked").await;
            std::panic::resume_unwind(panic)
        }
    }
}

/// Whether an error (of the caller's type) is a deadlock victim's: its text names SQLSTATE
/// 40P01, as every error of a victim does ([`Error`]'s, and any error that shows it), so the
/// caller's error type need not expose ours.
fn deadlock<E: std::fmt::Display>(e: &E) -> bool {
    e.to_string().contains("40P01")
}
