//! A saga's gRPC step inside the service it calls (docs/SAGAS.md §4): the service's own work and
//! the step's barrier row in one transaction of the service's own database, so that a repeated
//! call applies once, a compensation of a call that never applied is null, and that call,
//! arriving late, is fenced off. It is the barrier a participant keeps for SQL steps
//! (`participant/barrier.rs`), for a service that owns its database.
//!
//! The service creates the table once ([`SCHEMA`], in its own migrations), and each handler of
//! a saga step runs its work through [`action`] or [`compensation`]:
//!
//! ```no_run
//! # async fn charge(db: &mut tokio_postgres::Client, req: tonic::Request<Vec<u8>>)
//! #     -> Result<Vec<u8>, tonic::Status> {
//! use twopc::client::barrier;
//!
//! let step = barrier::Step::of(&req)?;
//! let ran = barrier::action(db, &step, async |tx| {
//!     tx.execute("INSERT INTO payments (amount) VALUES (42)", &[]).await?;
//!     Ok::<_, tokio_postgres::Error>(b"the encoded reply".to_vec())
//! })
//! .await
//! .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
//! ran.into_output() // the first run's reply, also on a repeat
//! # }
//! ```
//!
//! Rows are keyed by the SHA-256 of the secrets the coordinator sends in the call's metadata
//! (derived from its log's key), never by the saga's id, which any caller may know. The
//! coordinator sends the service no token of its own: a service that takes saga steps should
//! admit only the coordinator (mutual TLS), as it would any caller that moves money.

use crate::proto;
use ring::digest;
use tonic::metadata::MetadataMap;

/// The barrier's table, in the service's own database.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS twopc_saga_barrier (
    key bytea PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('action', 'fence', 'compensate')),
    output bytea,
    at timestamptz NOT NULL DEFAULT now())";

/// One half of a saga's step, as the coordinator's call says.
#[derive(Clone, Debug)]
pub struct Step {
    pub saga_id: String,
    pub step: String,
    /// Its compensation, not its action.
    pub compensate: bool,
    action_key: Vec<u8>,
    compensation_key: Option<Vec<u8>>,
}

impl Step {
    /// The step a coordinator's call is; INVALID_ARGUMENT for a call that is none.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Step, tonic::Status> {
        Step::of_metadata(request.metadata())
    }

    pub fn of_metadata(md: &MetadataMap) -> Result<Step, tonic::Status> {
        let text = |name: &str| {
            md.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or_else(|| {
                    tonic::Status::invalid_argument(format!(
                        "not a saga step: metadata {name} is missing (the coordinator sends it)"
                    ))
                })
        };
        let secret = |name: &str| {
            md.get_bin(name)
                .and_then(|v| v.to_bytes().ok())
                .filter(|b| b.len() >= 16)
                .map(|b| digest::digest(&digest::SHA256, &b).as_ref().to_vec())
        };
        let compensate = match text(proto::SAGA_OP_METADATA)?.as_str() {
            "action" => false,
            "compensate" => true,
            other => {
                return Err(tonic::Status::invalid_argument(format!(
                    "{} is {other:?}: action or compensate",
                    proto::SAGA_OP_METADATA
                )));
            }
        };
        let missing = |name: &str| {
            tonic::Status::invalid_argument(format!(
                "not a saga step: metadata {name} is missing or shorter than 16 bytes"
            ))
        };
        let action_key = secret(proto::SAGA_BARRIER_METADATA)
            .ok_or_else(|| missing(proto::SAGA_BARRIER_METADATA))?;
        let compensation_key = match compensate {
            true => Some(
                secret(proto::SAGA_COMPENSATION_METADATA)
                    .ok_or_else(|| missing(proto::SAGA_COMPENSATION_METADATA))?,
            ),
            false => None,
        };
        Ok(Step {
            saga_id: text(proto::SAGA_ID_METADATA)?,
            step: text(proto::SAGA_STEP_METADATA)?,
            compensate,
            action_key,
            compensation_key,
        })
    }
}

/// What the barrier let happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ran {
    /// The work ran and committed with the barrier row; an action's output.
    Applied(Vec<u8>),
    /// It ran before: nothing ran now; an action's first output.
    Repeated(Vec<u8>),
    /// An action whose compensation came first: nothing ran, and it never will.
    Fenced,
    /// A compensation whose action never ran here: nothing ran; the action is fenced off.
    Null,
}

impl Ran {
    /// As the handler answers the coordinator: the output (an action's reply, encoded), or
    /// FAILED_PRECONDITION for a fenced action, which fails the step for good.
    pub fn into_output(self) -> Result<Vec<u8>, tonic::Status> {
        match self {
            Ran::Applied(out) | Ran::Repeated(out) => Ok(out),
            Ran::Null => Ok(Vec::new()),
            Ran::Fenced => Err(tonic::Status::failed_precondition(
                "this saga step was compensated before it ran: it never runs",
            )),
        }
    }
}

/// Why a step did not run to an answer.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError<E> {
    /// The handler's work failed: its transaction, barrier row included, rolled back.
    #[error("{0}")]
    Work(E),
    /// The database failed around the work: nothing of it applied, unless COMMIT itself
    /// failed, when a repeat of the call finds out.
    #[error("the saga barrier's database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

const INSERT: &str =
    "INSERT INTO twopc_saga_barrier (key, kind) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";

/// Runs an action's `work` (which returns its output: the reply, encoded) in one transaction on
/// `client` with the step's barrier row. A repeat runs nothing and answers the first output; an
/// action whose compensation came first runs nothing ([`Ran::Fenced`]).
pub async fn action<E>(
    client: &mut tokio_postgres::Client,
    step: &Step,
    work: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<Vec<u8>, E>,
) -> Result<Ran, BarrierError<E>> {
    let tx = client.transaction().await?;
    let fresh = tx.execute(INSERT, &[&step.action_key, &"action"]).await? == 1;
    if !fresh {
        let row = tx
            .query_one(
                "SELECT kind, output FROM twopc_saga_barrier WHERE key = $1",
                &[&step.action_key],
            )
            .await?;
        let (kind, output): (String, Option<Vec<u8>>) = (row.get(0), row.get(1));
        return Ok(match kind.as_str() {
            "fence" => Ran::Fenced,
            _ => Ran::Repeated(output.unwrap_or_default()),
        });
    }
    let output = work(&tx).await.map_err(BarrierError::Work)?;
    tx.execute(
        "UPDATE twopc_saga_barrier SET output = $2 WHERE key = $1",
        &[&step.action_key, &output],
    )
    .await?;
    tx.commit().await?;
    Ok(Ran::Applied(output))
}

/// Runs a compensation's `work`, given its action's output, in one transaction on `client`
/// with the step's barrier rows. A repeat runs nothing; a compensation whose action never ran
/// here runs nothing and fences that action off ([`Ran::Null`]).
pub async fn compensation<E>(
    client: &mut tokio_postgres::Client,
    step: &Step,
    work: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>, Vec<u8>) -> Result<(), E>,
) -> Result<Ran, BarrierError<E>> {
    let Some(own) = &step.compensation_key else {
        // `Step::of` gives every compensation its key; an action has none.
        return Ok(Ran::Null);
    };
    let tx = client.transaction().await?;
    if tx.execute(INSERT, &[own, &"compensate"]).await? == 0 {
        return Ok(Ran::Repeated(Vec::new()));
    }
    // Waits for the action, if it is in flight, then sees its row.
    if tx.execute(INSERT, &[&step.action_key, &"fence"]).await? == 1 {
        tx.commit().await?;
        return Ok(Ran::Null);
    }
    let output: Option<Vec<u8>> = tx
        .query_one(
            "SELECT output FROM twopc_saga_barrier WHERE key = $1",
            &[&step.action_key],
        )
        .await?
        .get(0);
    work(&tx, output.unwrap_or_default())
        .await
        .map_err(BarrierError::Work)?;
    tx.commit().await?;
    Ok(Ran::Applied(Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::{BinaryMetadataValue, MetadataValue};

    fn md(op: &str, compensation: bool) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert(proto::SAGA_ID_METADATA, MetadataValue::from_static("o-1"));
        md.insert(proto::SAGA_STEP_METADATA, MetadataValue::from_static("pay"));
        md.insert(proto::SAGA_OP_METADATA, op.parse().unwrap());
        md.insert_bin(
            proto::SAGA_BARRIER_METADATA,
            BinaryMetadataValue::from_bytes(&[7; 32]),
        );
        if compensation {
            md.insert_bin(
                proto::SAGA_COMPENSATION_METADATA,
                BinaryMetadataValue::from_bytes(&[8; 32]),
            );
        }
        md
    }

    #[test]
    fn a_step_is_read_from_the_coordinators_metadata_and_keyed_by_hashes() {
        let action = Step::of_metadata(&md("action", false)).unwrap();
        assert!(!action.compensate);
        assert_eq!(action.action_key.len(), 32);
        assert_ne!(action.action_key, vec![7; 32], "the hash, not the secret");
        let comp = Step::of_metadata(&md("compensate", true)).unwrap();
        assert_eq!(comp.action_key, action.action_key);
        assert!(comp.compensation_key.is_some());
        let refused = |m: MetadataMap| Step::of_metadata(&m).unwrap_err().code();
        assert_eq!(
            refused(md("compensate", false)),
            tonic::Code::InvalidArgument
        );
        assert_eq!(refused(md("undo", false)), tonic::Code::InvalidArgument);
        assert_eq!(refused(MetadataMap::new()), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_fenced_action_fails_the_step_and_the_rest_answer_their_output() {
        assert_eq!(Ran::Applied(vec![1]).into_output().unwrap(), vec![1]);
        assert_eq!(Ran::Repeated(vec![1]).into_output().unwrap(), vec![1]);
        assert_eq!(
            Ran::Fenced.into_output().unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
    }
}
