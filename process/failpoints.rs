//! Named crash points for crash-recovery tests: a public interface, documented in
//! docs/FAILPOINTS.md, that outside harnesses drive too.
//!
//! Built only with the `testing` feature (CI's and the harness's builds); otherwise
//! [`failpoint!`] expands to nothing and costs nothing. Configured from the environment at
//! start, in tikv `fail` syntax: `FAILPOINTS="coordinator::decision_flushed=abort;..."`.
//! `abort` is ours: it ends the process on the spot, as SIGKILL would (no flush, no
//! destructors); `fail`'s own `panic` would only end one tokio task. Any other action (`off`,
//! `sleep(100)`, `delay(100)`, `print`, `pause`, ...) is handed to the `fail` crate as is.

/// Marks a crash point. `failpoint!("coordinator::decision_flushed")`.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "testing")]
        fail::fail_point!($name);
    };
}

/// Every crash point, for harnesses and `--list-failpoints`.
pub const ALL: &[(&str, &str)] = &[
    (
        "coordinator::branch_registered",
        "a participant's RegisterBranch is recorded, before the reply",
    ),
    (
        "coordinator::txn_created",
        "a transaction a client started itself is created by its first enlistment, before the branch is registered",
    ),
    (
        "coordinator::prepare_sent",
        "phase 1: just before a Prepare request goes to a participant",
    ),
    (
        "coordinator::votes_in",
        "every vote is in, before the decision is written",
    ),
    (
        "coordinator::decision_written",
        "the commit decision is written to the log, not yet flushed",
    ),
    (
        "coordinator::decision_flushed",
        "the commit decision is durable, before any COMMIT PREPARED is sent",
    ),
    (
        "coordinator::announced",
        "a commit decision is announced (Commit with wait = DECIDED answers now), before any COMMIT PREPARED is sent",
    ),
    (
        "coordinator::first_commit_acked",
        "one branch acknowledged COMMIT PREPARED, another has not",
    ),
    (
        "coordinator::before_complete",
        "every branch acknowledged, before the final record is written",
    ),
    (
        "coordinator::rollback_abandoned",
        "an abort's rollback was given up (its participant unreachable past --rollback-retry-for-ms), before the final record",
    ),
    (
        "coordinator::deadlock_victim_chosen",
        "the deadlock detector chose a victim, before aborting it",
    ),
    (
        "coordinator::one_phase_written",
        "one-phase commit of a lone branch: the OnePhase record is written, not yet flushed",
    ),
    (
        "coordinator::one_phase_flushed",
        "the OnePhase record is durable, before CommitOnePhase is sent",
    ),
    (
        "coordinator::one_phase_answered",
        "the participant answered CommitOnePhase, before the outcome is recorded or announced",
    ),
    (
        "participant::enlisted",
        "the coordinator answered an enlistment (over Enlist, or RegisterBranch), before the branch is opened and its first statement runs",
    ),
    (
        "participant::between_statements",
        "an Execute with several statements: one ran, the next has not",
    ),
    ("participant::before_prepare", "before PREPARE TRANSACTION"),
    (
        "participant::after_prepare",
        "PREPARE TRANSACTION done (and checked in the same batch), before the vote is decided",
    ),
    (
        "participant::before_vote_reply",
        "the vote is decided, before the reply is sent",
    ),
    (
        "participant::before_commit_prepared",
        "before COMMIT PREPARED",
    ),
    (
        "participant::after_commit_prepared",
        "COMMIT PREPARED done, before the reply",
    ),
    (
        "participant::before_rollback_prepared",
        "before ROLLBACK PREPARED",
    ),
    (
        "participant::before_one_phase_commit",
        "one-phase commit: before the COMMIT (with its marker) is sent",
    ),
    (
        "participant::after_one_phase_commit",
        "one-phase commit: COMMIT done (or failed), before the outcome is decided",
    ),
    (
        "participant::before_one_phase_reply",
        "one-phase commit: the outcome is decided, before the reply is sent",
    ),
    (
        "participant::after_rollback_prepared",
        "ROLLBACK PREPARED done, before the reply",
    ),
];

/// The crash points of sagas (docs/SAGAS.md §5): apart from [`ALL`], whose every point a bank
/// transfer workload reaches, because only a saga workload reaches these.
pub const SAGA: &[(&str, &str)] = &[
    (
        "coordinator::saga_submitted",
        "SubmitSaga: the plan is written, not yet flushed; no step sent",
    ),
    (
        "coordinator::saga_written",
        "SubmitSaga: the plan is durable, before the answer and before the first step",
    ),
    (
        "coordinator::saga_step_sent",
        "a saga action was sent and answered, before the answer is recorded",
    ),
    (
        "coordinator::saga_failed_written",
        "a saga step's failure (or exhaustion) is durable, before the first compensation",
    ),
    (
        "coordinator::saga_compensation_sent",
        "a saga compensation was sent and answered, before the answer is recorded",
    ),
    (
        "participant::before_saga_step_commit",
        "a saga action's statements and barrier row ran, before its local COMMIT",
    ),
    (
        "participant::saga_step_committed",
        "a saga action committed with its barrier row, before the reply",
    ),
    (
        "participant::before_saga_compensation_commit",
        "a saga compensation's statements and barrier rows ran, before its local COMMIT",
    ),
    (
        "participant::saga_compensation_committed",
        "a saga compensation (or a null one, with its fence) committed, before the reply",
    ),
];

/// Reads `FAILPOINTS` and arms each point. Call once at process start; without the
/// `testing` feature a set `FAILPOINTS` is an error, so a harness never tests a build
/// that cannot crash where it asked.
pub fn setup_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    if spec.trim().is_empty() {
        return Ok(());
    }
    #[cfg(not(feature = "testing"))]
    {
        Err(format!(
            "FAILPOINTS={spec:?} is set, but this binary was built without the `testing` feature (cargo build --features testing)"
        ))
    }
    #[cfg(feature = "testing")]
    {
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, action) = entry
                .split_once('=')
                .ok_or_else(|| format!("bad FAILPOINTS entry {entry:?}: expected name=action"))?;
            if !ALL.iter().chain(SAGA).any(|(n, _)| *n == name) {
                return Err(format!(
                    "unknown failpoint {name:?}; see docs/FAILPOINTS.md"
                ));
            }
            if action == "abort" {
                fail::cfg_callback(name, || {
                    eprintln!("failpoint hit: aborting the process");
                    std::process::abort()
                })?;
            } else {
                fail::cfg(name, action)?;
            }
        }
        Ok(())
    }
}
