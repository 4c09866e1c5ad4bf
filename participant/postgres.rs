//! The participant's PostgreSQL: a connection pool and the two-phase-commit statements.
//!
//! Each open branch owns one pooled connection (a shared client would interleave sessions); the
//! connection goes back to the pool once the branch is prepared or rolled back. `COMMIT PREPARED`
//! and `ROLLBACK PREPARED` run on any pooled connection, outside a transaction block.
//!
//! Knowing the outcome for certain: PostgreSQL answers `PREPARE TRANSACTION` without an error
//! when the transaction had already failed (it rolls back instead), so a yes vote is given only
//! once the gid is seen in `pg_prepared_xacts`. When a gid is gone, `pg_xact_status` of the xid
//! read before PREPARE tells whether it committed or rolled back.
//!
//! A lone branch commits in one phase: its COMMIT carries a marker row, addressed by the
//! coordinator's secret and written only through functions of another role (`marker.rs`),
//! which is how a repeated CommitOnePhase learns the truth after any crash; a secret with no
//! marker is fenced with a `false` row, which waits for a commit under the same secret still in
//! flight (the primary key) and rules out any later one.
//!
//! A client's SQL shares the branch's session, and the role's persisted settings reach every
//! session. So the protocol trusts neither: its statements name every function, type and
//! operator by schema (a client may put its own `pg_current_xact_id_if_assigned` ahead of
//! `pg_catalog` in `search_path`), its own connections start with the settings it needs
//! ([`PROTOCOL_SETTINGS`]), and a one-phase COMMIT is never asynchronous.

use super::barrier::{self, Op, StepAnswer, StepCall};
use super::database::{Database, LockWait, Prepared, PreparedBranch, XactStatus, settle_gone};
use super::error::Error;
use super::gid::Gid;
use super::marker;
use super::pg_tls::{self, PgTls};
use super::sql;
use super::statement::{self, Datum, Rows, SqlError};
use crate::proto::marker::MarkerSecret;
use crate::proto::vote::OnePhaseOutcome;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, ObjectId, Pool, PoolError, RecyclingMethod, Runtime,
    TimeoutType,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

/// Resets everything a session can carry from one branch to the next (what deadpool's
/// `RecyclingMethod::Clean` would run before every use; here it runs once, after a branch).
const CLEAN_SESSION: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
                             SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES;";

/// What the protocol's own connections start with, as startup options: they take precedence
/// over `ALTER ROLE … SET` and `ALTER DATABASE … SET`, which a client's SQL may have slipped
/// in (through a `DO` block, say). Only settings every supported PostgreSQL knows: an unknown
/// one fails the connection.
pub const PROTOCOL_SETTINGS: &str = "-c search_path=pg_catalog,pg_temp -c statement_timeout=0 \
     -c lock_timeout=0 -c idle_in_transaction_session_timeout=0 \
     -c default_transaction_read_only=off -c default_transaction_isolation=read\\ committed \
     -c synchronous_commit=on";

/// Before a one-phase COMMIT, on the branch's session: its own role back (the client may have
/// switched to one that may not call the marker function), and a synchronous commit (a client
/// may have set `synchronous_commit = off`, and an asynchronous COMMIT answered "committed"
/// can be lost in a PostgreSQL crash).
const BEFORE_ONE_PHASE_COMMIT: &str = "SET SESSION AUTHORIZATION DEFAULT; RESET ROLE; \
     SELECT pg_catalog.set_config('synchronous_commit', 'on', true) \
      WHERE pg_catalog.current_setting('synchronous_commit') OPERATOR(pg_catalog.=) 'off'";

/// The role's and the database's persisted settings (`ALTER ROLE … SET`, `ALTER DATABASE …
/// SET`): they reach every branch's session.
const PERSISTED_SETTINGS: &str = "
    SELECT CASE WHEN s.setrole OPERATOR(pg_catalog.=) 0 THEN 'ALTER DATABASE'
                ELSE 'ALTER ROLE' END,
           pg_catalog.array_to_string(s.setconfig, ', ')
      FROM pg_catalog.pg_db_role_setting AS s
     WHERE (s.setrole OPERATOR(pg_catalog.=) 0 OR pg_catalog.pg_has_role(s.setrole, 'MEMBER'))
       AND s.setdatabase OPERATOR(pg_catalog.=) ANY (ARRAY[0::pg_catalog.oid,
           (SELECT d.oid FROM pg_catalog.pg_database AS d
             WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())])";

/// Connections kept for the protocol's own statements (COMMIT/ROLLBACK PREPARED, the gid
/// lookups, Recover, one-phase markers), apart from the branches' pool: open branches, however
/// many and however idle, never keep phase 2 or recovery waiting.
pub const PROTOCOL_CONNECTIONS: usize = 4;

/// The sessions among `$1` that have waited at least `$2` ms for a lock, and every session
/// blocking each (`pg_blocking_pids`: holders, and those queued ahead). A prepared transaction
/// blocks as pid 0; it is named by its gid when the wait is on its transaction id. The wait's
/// start is `pg_locks.waitstart` (PostgreSQL 14+; read through to_jsonb, so that 13 parses the
/// query too), else the statement's start.
const LOCK_WAITS: &str = "
    SELECT l.pid AS waiter, b.pid AS holder,
           (extract(epoch FROM now() - coalesce((to_jsonb(l) ->> 'waitstart')::timestamptz,
                                                w.query_start, now())) * 1000)::int8 AS waited_ms,
           l.locktype || coalesce(' on ' || l.relation::regclass::text, '') || ' (' || l.mode || ')'
               AS lock,
           coalesce(a.application_name, '') AS holder_app,
           coalesce(a.state, '') AS holder_state,
           left(coalesce(a.query, ''), 80) AS holder_query,
           CASE WHEN b.pid = 0 AND l.locktype = 'transactionid' THEN
               (SELECT p.gid FROM pg_prepared_xacts p WHERE p.transaction = l.transactionid)
           END AS holder_gid
    FROM pg_locks l
    JOIN pg_stat_activity w ON w.pid = l.pid
    CROSS JOIN LATERAL unnest(pg_blocking_pids(l.pid)) AS b(pid)
    LEFT JOIN pg_stat_activity a ON a.pid = b.pid
    WHERE NOT l.granted AND l.pid = ANY($1)
      AND coalesce((to_jsonb(l) ->> 'waitstart')::timestamptz, w.query_start, now())
          <= now() - $2::int8 * interval '1 millisecond'";

/// A PostgreSQL database reached through two connection pools: one for branches, one for the
/// protocol.
pub struct Postgres {
    /// Each open branch holds one of these from its first statement to its end.
    pool: Pool,
    /// [`PROTOCOL_CONNECTIONS`] for the protocol's statements, which never wait for a branch.
    protocol: Pool,
    /// `max_connections`, for messages.
    branch_connections: usize,
    /// For connections outside the pool (the health check's), with [`PROTOCOL_SETTINGS`].
    config: tokio_postgres::Config,
    /// For messages: where PostgreSQL is, without the password.
    target: String,
    /// The markers are there and out of the clients' reach (`marker::check`): lone branches
    /// commit in one phase.
    one_phase: AtomicBool,
    /// TLS to PostgreSQL (`sslmode`), for the connections outside the pools too.
    tls: PgTls,
    /// What one Execute may carry and return (`--max-sql-bytes`, `--max-result-rows`, …).
    limits: statement::Limits,
    /// The server process of each branch connection, asked once per connection: the lock
    /// tables name sessions by it (`Database::lock_waits`).
    pids: std::sync::Mutex<HashMap<ObjectId, i32>>,
}

impl Postgres {
    pub fn new(conn_str: &str, max_connections: usize) -> Result<Self, Error> {
        let (conn_str, tls) = pg_tls::from_conn_str(conn_str)?;
        let config: tokio_postgres::Config = conn_str.parse().map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot parse the PostgreSQL connection string: {e}"
            ))
        })?;
        let target = format!(
            "{:?} port {:?} db {:?}{}",
            config.get_hosts(),
            config.get_ports(),
            config.get_dbname().unwrap_or("(default)"),
            if matches!(tls, PgTls::On(_)) {
                " over TLS"
            } else {
                ""
            },
        );
        // Branches keep the role's settings (an administrator's search_path is the
        // application's); the protocol's connections start with their own.
        let mut protocol_config = config.clone();
        protocol_config.options(&match config.get_options() {
            Some(own) => format!("{own} {PROTOCOL_SETTINGS}"),
            None => PROTOCOL_SETTINGS.to_string(),
        });
        let pool = |size, config: &tokio_postgres::Config| {
            // Branch connections are cleaned when released (`release`), off the critical
            // path; the pool only checks that a connection is still open.
            let recycling = ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            };
            let manager = match &tls {
                PgTls::Off => Manager::from_config(config.clone(), NoTls, recycling),
                PgTls::On(rustls) => {
                    Manager::from_config(config.clone(), rustls.clone(), recycling)
                }
            };
            Pool::builder(manager)
                .max_size(size)
                .wait_timeout(Some(Duration::from_secs(5)))
                .create_timeout(Some(Duration::from_secs(5)))
                .recycle_timeout(Some(Duration::from_secs(5)))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| Error::Internal(format!("cannot build a connection pool: {e}")))
        };
        Ok(Postgres {
            pool: pool(max_connections, &config)?,
            protocol: pool(PROTOCOL_CONNECTIONS, &protocol_config)?,
            branch_connections: max_connections,
            config: protocol_config,
            target,
            one_phase: AtomicBool::new(false),
            tls,
            limits: statement::Limits::default(),
            pids: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Turns one-phase commit on if this database keeps its markers out of the clients' reach
    /// for this role (`marker::check`); otherwise says why at WARN, with the command that fixes
    /// it, and every branch takes two phases.
    pub async fn set_up_one_phase(&self) {
        let access = async {
            let conn = self.pooled().await?;
            let row = conn.query_one(marker::CHECK, &[]).await?;
            let flag = |i| row.get::<_, Option<bool>>(i).unwrap_or(false);
            Ok::<_, Error>(marker::Access {
                superuser: flag(0),
                table_exists: flag(1),
                owner: row.get(2),
                owns: flag(3),
                writes_table: flag(4),
                creates_in_schema: flag(5),
                functions_ready: flag(6),
                legacy_table_owned: flag(7),
            })
        }
        .await;
        let role = self.config.get_user().unwrap_or("<the participant's role>");
        let db = self.config.get_dbname().unwrap_or("<its database>");
        let fix = format!(
            "to turn it on, run as a superuser: participant --print-setup-sql --postgres \"user={role} dbname={db}\" | psql -d {db}"
        );
        match access {
            Ok(access) => {
                if access.legacy_table_owned {
                    tracing::warn!(
                        "this role still owns twopc.one_phase_outcomes, an earlier version's one-phase markers, which its clients' SQL can write; nothing reads it any more ({fix})"
                    );
                }
                match access.refusal() {
                    None => {
                        self.one_phase.store(true, Ordering::SeqCst);
                        tracing::info!(
                            "one-phase commit of lone branches: on (markers in twopc.one_phase_markers, owned by {})",
                            access.owner.as_deref().unwrap_or(marker::OWNER)
                        );
                    }
                    Some(why) => tracing::warn!(
                        "one-phase commit is off, every branch is committed in two phases: {why}; {fix}"
                    ),
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "one-phase commit is off: could not check its markers; {fix}"
            ),
        }
    }

    /// Says at WARN which settings the role and the database have persisted: each reaches every
    /// branch's session (the protocol's own sessions override them). A client's SQL cannot set
    /// them through Execute (`statement::check_allowed`), but could through a function or a `DO`
    /// block, so they are named at every start.
    pub async fn report_persisted_settings(&self) -> Result<(), Error> {
        let conn = self.pooled().await?;
        for row in conn.query(PERSISTED_SETTINGS, &[]).await? {
            let (by, settings): (String, String) = (row.get(0), row.get(1));
            tracing::warn!(
                settings,
                "PostgreSQL at {} has settings persisted by {by} … SET for this role or database: every branch's session starts with them (the participant's own sessions override them). If nobody chose them, check who ran {by}",
                self.target
            );
        }
        Ok(())
    }

    /// Limits other than [`statement::Limits::default`] (`--max-sql-bytes`, `--max-result-rows`, …).
    pub fn with_limits(mut self, limits: statement::Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// A connection for the protocol's own statements.
    async fn pooled(&self) -> Result<Object, Error> {
        self.protocol.get().await.map_err(|e| {
            Error::Unavailable(format!(
                "PostgreSQL at {} is not available: {}",
                self.target,
                with_causes(&e)
            ))
        })
    }

    /// A connection for a branch. Every one held by open branches is RESOURCE_EXHAUSTED, not the
    /// database being down.
    async fn branch_conn(&self) -> Result<Object, Error> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Timeout(TimeoutType::Wait) => Error::ResourceExhausted(format!(
                "all {} branch connections to PostgreSQL at {} (--max-connections) are held by open branches; retry once some end, or raise --max-connections (and PostgreSQL's max_connections)",
                self.branch_connections, self.target
            )),
            e => Error::Unavailable(format!(
                "PostgreSQL at {} is not available: {}",
                self.target,
                with_causes(&e)
            )),
        })
    }

    /// A connection of its own, outside the pool: a pool busy with open branches must not make
    /// the server look unhealthy.
    pub async fn connect_outside_pool(&self) -> Result<tokio_postgres::Client, Error> {
        let unavailable = |e: tokio_postgres::Error| {
            Error::Unavailable(format!(
                "PostgreSQL at {} is not available: {}",
                self.target,
                with_causes(&e)
            ))
        };
        Ok(match &self.tls {
            PgTls::Off => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(unavailable)?;
                tokio::spawn(connection);
                client
            }
            PgTls::On(rustls) => {
                let (client, connection) = self
                    .config
                    .connect(rustls.clone())
                    .await
                    .map_err(unavailable)?;
                tokio::spawn(connection);
                client
            }
        })
    }

    /// Refuses a server that cannot prepare transactions, with the fix.
    pub async fn check_prepared_transactions_enabled(&self) -> Result<(), Error> {
        let conn = self.pooled().await?;
        let row = conn
            .query_one("SHOW max_prepared_transactions", &[])
            .await?;
        let n: i64 = row.get::<_, String>(0).parse().unwrap_or(0);
        if n == 0 {
            return Err(Error::FailedPrecondition(format!(
                "PostgreSQL at {} has max_prepared_transactions = 0, so it cannot prepare transactions. \
                 Set max_prepared_transactions (e.g. 100, at least the number of concurrent branches) \
                 in postgresql.conf and restart PostgreSQL.",
                self.target
            )));
        }
        Ok(())
    }

    /// Refuses to serve as a superuser unless `allowed`: every client that reaches the
    /// participant runs its statements as this role, and a superuser's statements reach the
    /// host (`COPY … TO PROGRAM`). The message shows how to make a suitable role.
    pub async fn check_not_superuser(&self, allowed: bool) -> Result<(), Error> {
        let conn = self.pooled().await?;
        let row = conn
            .query_one(
                "SELECT current_user::text, current_setting('is_superuser') = 'on', \
                        current_database()::text",
                &[],
            )
            .await?;
        let (role, superuser, db): (String, bool, String) = (row.get(0), row.get(1), row.get(2));
        if !superuser {
            return Ok(());
        }
        if allowed {
            tracing::warn!(
                role,
                "connected to PostgreSQL as a superuser (--allow-superuser): every client that \
                 reaches this participant can run anything as {role}"
            );
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "the participant connects to PostgreSQL at {target} as {role}, a superuser, and every \
             client that reaches it would run its statements as {role} (COPY ... TO PROGRAM runs \
             shell commands on the database host). Connect as a role without superuser that may \
             do what your transactions do, for example, as {role}: \
             CREATE ROLE twopc_participant LOGIN PASSWORD '...'; \
             GRANT CONNECT ON DATABASE {db} TO twopc_participant; \
             GRANT USAGE ON SCHEMA public TO twopc_participant; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO twopc_participant; \
             then use user=twopc_participant in --postgres, and for one-phase commit run the \
             output of participant --print-setup-sql --postgres \"user=twopc_participant dbname={db}\" \
             as {role}. \
             Every participant on this database must use the same role: only the role that \
             prepared a transaction may commit it. To run as {role} anyway, pass --allow-superuser.",
            target = self.target
        )))
    }

    /// Phase 1 on the branch's connection; answers too whether the connection came out clean
    /// (see [`Postgres::release`]). On `Err` the connection's state is unknown, so it is
    /// detached from the pool.
    async fn prepare_on(&self, conn: Object, gid: &Gid) -> Result<(Prepared, Object, bool), Error> {
        // One round trip: the xid (NULL if the branch wrote nothing), the PREPARE, and the
        // check that it really prepared (after a failed statement PREPARE rolls back without
        // an error). The statements run in order and stop at the first error. The check reads
        // `pg_prepared_xact()` itself: the `pg_prepared_xacts` view joins two catalogs, and
        // planning it cost PostgreSQL about 80 µs a branch (docs/BENCHMARKS.md).
        let gid_literal = gid.literal();
        let batch = format!(
            "SELECT pg_catalog.pg_current_xact_id_if_assigned()::pg_catalog.text; \
             PREPARE TRANSACTION {gid_literal}; \
             SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_xact() AS p \
              WHERE p.gid OPERATOR(pg_catalog.=) {gid_literal}::pg_catalog.text"
        );
        crate::failpoint!("participant::before_prepare");
        // The session's cleaning rides in the same round trip, as a query of its own (its
        // failure cannot be taken for the PREPARE's): after a PREPARE, failed or not, the
        // session is outside any transaction and the cleaning runs; if the transaction block
        // had failed before, the cleaning fails too and the connection is cleaned (or closed)
        // as any other.
        let (result, cleaned) =
            tokio::join!(conn.simple_query(&batch), conn.batch_execute(CLEAN_SESSION));
        crate::failpoint!("participant::after_prepare");
        let outcome = async {
            let messages = match result {
                Ok(messages) => messages,
                // A deferred constraint, a serialization failure: a failed PREPARE becomes a
                // ROLLBACK. (Were the session left in a failed block, `release` would find out
                // and close the connection.)
                Err(e) if e.as_db_error().is_some() => return Ok(Prepared::No { reason: describe(&e) }),
                Err(e) => return Err(e.into()),
            };
            let rows: Vec<&tokio_postgres::SimpleQueryRow> = messages
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                    _ => None,
                })
                .collect();
            let (Some(xid_row), Some(count_row)) = (rows.first(), rows.get(1)) else {
                return Err(Error::Internal("PREPARE returned no rows to check".into()));
            };
            if count_row.get(0) != Some("1") {
                return Ok(Prepared::No {
                    reason: "the transaction had already failed; PostgreSQL rolled it back instead of preparing it".into(),
                });
            }
            match xid_row.get(0) {
                // It wrote nothing: nothing for the global decision to decide.
                None => {
                    conn.batch_execute(&format!("COMMIT PREPARED {gid_literal}")).await?;
                    Ok(Prepared::ReadOnly)
                }
                Some(xid) => Ok(Prepared::Yes {
                    xid: xid.parse().map_err(|_| Error::Internal(format!("unexpected xid8 {xid:?}")))?,
                }),
            }
        }
        .await;
        match outcome {
            Ok(p) => Ok((p, conn, cleaned.is_ok())),
            Err(e) => {
                // Its state is unknown: not back to the pool.
                drop(Object::take(conn));
                Err(e)
            }
        }
    }

    /// Gives a branch's connection back to the pool, off the caller's critical path: first it
    /// is cleaned, because a client's statements may have left session state behind (`SET`
    /// and `SET ROLE` survive PREPARE) that the next branch must not inherit.
    pub(super) fn release(conn: Object) {
        tokio::spawn(async move {
            if conn.batch_execute(CLEAN_SESSION).await.is_err() {
                drop(Object::take(conn));
            }
        });
    }

    /// The xid8 of a prepared gid, if it is prepared. `pg_prepared_xacts` shows a 32-bit xid;
    /// the epoch comes from the next xid, which is at most one wraparound ahead of it.
    async fn xid_of_prepared(&self, gid: &Gid) -> Result<Option<u64>, Error> {
        let conn = self.pooled().await?;
        let row = conn
            .query_opt(
                "SELECT transaction::text, pg_snapshot_xmax(pg_current_snapshot())::text \
                 FROM pg_prepared_xacts WHERE gid = $1",
                &[&gid.to_string()],
            )
            .await?;
        Ok(row.and_then(|r| full_xid(r.get(0), r.get(1))))
    }

    async fn prepared_list(&self, min_age: Duration) -> Result<Vec<PreparedBranch>, Error> {
        let conn = self.pooled().await?;
        let rows = conn
            .query(
                "SELECT gid, extract(epoch FROM now() - prepared)::float8, transaction::text, \
                        pg_snapshot_xmax(pg_current_snapshot())::text \
                 FROM pg_prepared_xacts \
                 WHERE gid LIKE $1 AND prepared <= now() - make_interval(secs => $2) ORDER BY prepared",
                &[&Gid::like_all(), &min_age.as_secs_f64()],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(PreparedBranch {
                    gid: Gid::parse(r.get(0))?,
                    age_s: r.get(1),
                    xid: full_xid(r.get(2), r.get(3)).unwrap_or(0),
                })
            })
            .collect())
    }

    /// Phase 2. Idempotent: when the gid is gone, `pg_xact_status` of its xid says whether it
    /// ended the asked way (`settle_gone`).
    async fn finish(&self, gid: &Gid, xid: u64, commit: bool) -> Result<(), Error> {
        let conn = self.pooled().await?;
        let verb = if commit {
            "COMMIT PREPARED"
        } else {
            "ROLLBACK PREPARED"
        };
        if commit {
            crate::failpoint!("participant::before_commit_prepared");
        } else {
            crate::failpoint!("participant::before_rollback_prepared");
        }
        let finished = conn
            .batch_execute(&format!("{verb} {}", gid.literal()))
            .await;
        if commit {
            crate::failpoint!("participant::after_commit_prepared");
        } else {
            crate::failpoint!("participant::after_rollback_prepared");
        }
        match finished {
            Ok(()) => return Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {}
            Err(e) => return Err(e.into()),
        }
        // The gid is gone: finished earlier (a repeat after a lost reply), or never prepared.
        let status = match xid {
            0 => None,
            xid => Some(self.xact_status(&conn, xid).await?),
        };
        settle_gone(gid, xid, commit, status)
    }

    async fn xact_status(&self, conn: &Object, xid: u64) -> Result<XactStatus, Error> {
        let row = conn
            .query_one("SELECT pg_xact_status($1::text::xid8)", &[&xid.to_string()])
            .await;
        let status: Option<String> = match row {
            Ok(r) => r.get(0),
            // "transaction ID ... is in the future" and the like: nothing we can tell from.
            Err(e) if e.code().is_some() => None,
            Err(e) => return Err(e.into()),
        };
        Ok(match status.as_deref() {
            Some("committed") => XactStatus::Committed,
            Some("aborted") => XactStatus::Aborted,
            Some("in progress") => XactStatus::InProgress,
            _ => XactStatus::Unknown,
        })
    }

    /// A saga step's local transaction on `conn` (docs/SAGAS.md §4): the barrier row first,
    /// then the statements, then COMMIT. `Err` leaves the transaction to be rolled back by the
    /// caller (or by the connection's end): nothing of the step applied, unless the error came
    /// at COMMIT itself, when the barrier makes the coordinator's retry find out.
    async fn run_step(&self, conn: &Object, call: &StepCall) -> Result<StepAnswer, StepError> {
        let action = call.action_secret.as_bytes();
        conn.batch_execute("BEGIN").await?;
        let extra = match call.op {
            Op::Action => {
                let row = conn
                    .query_typed(barrier::ACTION, &[(&action, Type::BYTEA)])
                    .await
                    .map_err(StepError::barrier)?;
                let row = row.first().ok_or(StepError::NoBarrierRow)?;
                let (fresh, fenced, output): (bool, bool, Option<Vec<u8>>) =
                    (row.get(0), row.get(1), row.get(2));
                if fenced {
                    return Ok(StepAnswer::Fenced);
                }
                if !fresh {
                    return Ok(StepAnswer::Repeated(barrier::from_stored(
                        output.as_deref().unwrap_or_default(),
                    )));
                }
                call.inputs.concat()
            }
            // (A forget never gets here: `saga_step` runs it alone.)
            Op::Compensate | Op::Forget => {
                let own = call
                    .compensation_secret
                    .as_ref()
                    .ok_or(StepError::NoCompensationSecret)?;
                let row = conn
                    .query_typed(
                        barrier::COMPENSATE,
                        &[(&action, Type::BYTEA), (&own.as_bytes(), Type::BYTEA)],
                    )
                    .await
                    .map_err(StepError::barrier)?;
                let row = row.first().ok_or(StepError::NoBarrierRow)?;
                let (repeat, null, output): (bool, bool, Option<Vec<u8>>) =
                    (row.get(0), row.get(1), row.get(2));
                if repeat {
                    return Ok(StepAnswer::Repeated(Rows::default()));
                }
                if null {
                    conn.batch_execute("COMMIT").await?;
                    return Ok(StepAnswer::Null);
                }
                barrier::from_stored(output.as_deref().unwrap_or_default())
                    .rows
                    .into_iter()
                    .next()
                    .unwrap_or_default()
            }
        };
        let mut last = Rows::default();
        for statement in &call.statements {
            let statement = match call.bind_outputs {
                true => barrier::bound(statement, &extra),
                false => statement.clone(),
            };
            self.limits
                .check_request(&statement.sql, statement.params.len())?;
            statement::check_allowed(&statement.sql)?;
            last =
                sql::execute(conn, &statement.sql, &statement.params, false, &self.limits).await?;
        }
        // The client's statements may have switched role or made commits asynchronous.
        match call.op {
            Op::Action => {
                crate::failpoint!("participant::before_saga_step_commit");
            }
            Op::Compensate | Op::Forget => {
                crate::failpoint!("participant::before_saga_compensation_commit");
            }
        }
        // One round trip, pipelined as a one-phase COMMIT is: the session's own role and a
        // synchronous commit back (the client's statements may have changed them), an
        // action's output into its barrier row, COMMIT. After an error the rest runs in a
        // failed transaction, whose COMMIT rolls back: the first error says what happened.
        let stored = barrier::stored(&last);
        let record = async {
            match call.op {
                Op::Action => conn
                    .query_typed(
                        barrier::RECORD_OUTPUT,
                        &[(&action, Type::BYTEA), (&stored, Type::BYTEA)],
                    )
                    .await
                    .map(drop),
                Op::Compensate | Op::Forget => Ok(()),
            }
        };
        let (before, recorded, committed) = tokio::join!(
            conn.batch_execute(BEFORE_ONE_PHASE_COMMIT),
            record,
            conn.batch_execute("COMMIT"),
        );
        before?;
        recorded.map_err(StepError::barrier)?;
        committed.map_err(StepError::Commit)?;
        Ok(StepAnswer::Applied(last))
    }
}

impl Postgres {
    /// A final saga's step rows deleted, on a protocol connection (it runs no client SQL).
    async fn forget_step(&self, call: &StepCall) -> Result<StepAnswer, Error> {
        let own = call
            .compensation_secret
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument(StepError::NoCompensationSecret.to_string()))?;
        let conn = self.pooled().await?;
        conn.query_typed(
            barrier::FORGET,
            &[
                (&call.action_secret.as_bytes(), Type::BYTEA),
                (&own.as_bytes(), Type::BYTEA),
            ],
        )
        .await
        .map_err(|e| match StepError::barrier(e) {
            StepError::Barrier(why) => Error::FailedPrecondition(why),
            other => Error::Unavailable(other.to_string()),
        })?;
        Ok(StepAnswer::Applied(Rows::default()))
    }
}

/// Why a saga step's local transaction did not commit.
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// A statement of the step failed: nothing applied.
    #[error(transparent)]
    Statement(#[from] SqlError),
    /// The barrier's functions are missing or refused this role.
    #[error("{0}")]
    Barrier(String),
    #[error("the saga barrier function returned no row")]
    NoBarrierRow,
    #[error("a compensation needs its own barrier secret (compensation_secret)")]
    NoCompensationSecret,
    /// COMMIT failed: whether it committed is for the barrier to tell on a retry.
    #[error("COMMIT of the saga step: {}", describe(.0))]
    Commit(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for StepError {
    fn from(e: tokio_postgres::Error) -> Self {
        StepError::Statement(e.into())
    }
}

impl StepError {
    fn barrier(e: tokio_postgres::Error) -> StepError {
        match e.code() {
            Some(&SqlState::UNDEFINED_FUNCTION) | Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                StepError::Barrier(format!(
                    "this database has no saga barrier this role may use ({}); run as a superuser: participant --print-setup-sql --postgres \"user=<role> dbname=<db>\" | psql -d <db>",
                    describe(&e)
                ))
            }
            _ => StepError::Statement(e.into()),
        }
    }
}

impl Database for Postgres {
    type Conn = Object;
    type Cancel = tokio_postgres::CancelToken;

    async fn conn(&self) -> Result<Object, Error> {
        let conn = self.branch_conn().await?;
        let id = Object::id(&conn);
        if !self.pids.lock().unwrap().contains_key(&id) {
            let pid: i32 = conn
                .query_one("SELECT pg_catalog.pg_backend_pid()", &[])
                .await?
                .get(0);
            let mut pids = self.pids.lock().unwrap();
            // Connections the pool has closed leave their entries behind; start afresh
            // now and then (the rest are asked again, once each).
            if pids.len() >= 2 * self.branch_connections {
                pids.clear();
            }
            pids.insert(id, pid);
        }
        Ok(conn)
    }

    fn cancel_handle(conn: &Object) -> tokio_postgres::CancelToken {
        conn.cancel_token()
    }

    fn backend_pid(&self, conn: &Object) -> Option<i32> {
        self.pids.lock().unwrap().get(&Object::id(conn)).copied()
    }

    async fn lock_waits(&self, of: &[i32], min_wait: Duration) -> Result<Vec<LockWait>, Error> {
        let conn = self.pooled().await?;
        let min_ms = i64::try_from(min_wait.as_millis()).unwrap_or(i64::MAX);
        let rows = conn.query(LOCK_WAITS, &[&of, &min_ms]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                let holder: i32 = r.get("holder");
                let gid: Option<String> = r.get("holder_gid");
                let holder_text = match (holder, &gid) {
                    (0, Some(gid)) => format!("prepared transaction {gid}"),
                    (0, None) => "a prepared transaction".to_string(),
                    (pid, _) => format!(
                        "pid {pid} ({}, {}): {}",
                        r.get::<_, String>("holder_app"),
                        r.get::<_, String>("holder_state"),
                        r.get::<_, String>("holder_query")
                    ),
                };
                LockWait {
                    waiter: r.get("waiter"),
                    holder,
                    holder_text,
                    holder_gid: gid,
                    waited_ms: u32::try_from(r.get::<_, i64>("waited_ms").max(0))
                        .unwrap_or(u32::MAX),
                    lock: r.get("lock"),
                }
            })
            .collect())
    }

    async fn cancel(&self, token: &tokio_postgres::CancelToken) {
        let cancelled = match &self.tls {
            PgTls::Off => token.cancel_query(NoTls).await,
            PgTls::On(rustls) => token.cancel_query(rustls.clone()).await,
        };
        if let Err(e) = cancelled {
            tracing::warn!(error = %e, "could not cancel a running statement");
        }
    }

    fn limits(&self) -> statement::Limits {
        self.limits
    }

    async fn begin(&self, conn: &Object) -> Result<(), SqlError> {
        Ok(conn.batch_execute("BEGIN").await?)
    }

    async fn execute(
        &self,
        conn: &Object,
        sql: &str,
        params: &[Datum],
        begin: bool,
    ) -> Result<Rows, SqlError> {
        sql::execute(conn, sql, params, begin, &self.limits).await
    }

    async fn prepare(&self, conn: Object, gid: &Gid) -> Result<Prepared, Error> {
        let (prepared, conn, clean) = self.prepare_on(conn, gid).await?;
        match clean {
            // Back to the pool as it is.
            true => drop(conn),
            false => Postgres::release(conn),
        }
        Ok(prepared)
    }

    async fn roll_back_open(&self, conn: Object) {
        match conn.batch_execute("ROLLBACK").await {
            Ok(()) => Postgres::release(conn),
            // Closing the connection rolls the transaction back all the same.
            Err(_) => drop(Object::take(conn)),
        }
    }

    async fn finish_prepared(&self, gid: &Gid, xid: u64, commit: bool) -> Result<(), Error> {
        self.finish(gid, xid, commit).await
    }

    async fn prepared_xid(&self, gid: &Gid) -> Result<Option<u64>, Error> {
        self.xid_of_prepared(gid).await
    }

    fn one_phase(&self) -> bool {
        self.one_phase.load(Ordering::SeqCst)
    }

    async fn commit_one_phase(
        &self,
        conn: Object,
        _gid: &Gid,
        secret: &MarkerSecret,
        forget: &[MarkerSecret],
    ) -> Result<OnePhaseOutcome, Error> {
        // One round trip, pipelined: the session's own role and a synchronous commit; the
        // marker (if the branch wrote anything; the function reads the xid) and the deletion
        // of the markers the coordinator is done with, the secrets bound as parameters so that
        // no other session sees them in pg_stat_activity; COMMIT. After an error the rest runs
        // in a failed transaction, and its COMMIT rolls back.
        let forget: Vec<&[u8]> = forget.iter().map(MarkerSecret::as_bytes).collect();
        let params: [(&(dyn ToSql + Sync), Type); 2] = [
            (&secret.as_bytes(), Type::BYTEA),
            (&forget, Type::BYTEA_ARRAY),
        ];
        crate::failpoint!("participant::before_one_phase_commit");
        let (before, marked, committed) = tokio::join!(
            conn.batch_execute(BEFORE_ONE_PHASE_COMMIT),
            conn.query_typed(marker::COMMIT_MARKER, &params),
            conn.batch_execute("COMMIT"),
        );
        crate::failpoint!("participant::after_one_phase_commit");
        // The first failure is the one that says what happened; the later ones follow from it.
        let result = before.and(marked).and_then(|rows| committed.map(|()| rows));
        match result {
            Ok(rows) => {
                let wrote = rows.first().and_then(|r| r.get::<_, Option<String>>(0));
                Self::release(conn);
                Ok(OnePhaseOutcome::Committed {
                    read_only: wrote.is_none(),
                })
            }
            // An ERROR (a deferred constraint, a serialization failure at COMMIT, …) ends the
            // transaction without committing it. A FATAL or a broken connection may come
            // after the commit record is flushed: that is for the marker to tell.
            Err(e) if e.as_db_error().is_some_and(|d| d.severity() == "ERROR") => {
                if conn.batch_execute("ROLLBACK").await.is_ok() {
                    Self::release(conn);
                } else {
                    drop(Object::take(conn));
                }
                Ok(OnePhaseOutcome::Aborted {
                    reason: describe(&e),
                })
            }
            Err(e) => {
                drop(Object::take(conn));
                Err(e.into())
            }
        }
    }

    async fn one_phase_outcome(
        &self,
        gid: &Gid,
        secret: &MarkerSecret,
        fence: bool,
    ) -> Result<Option<bool>, Error> {
        let conn = self.pooled().await?;
        let row = conn
            .query_typed(
                marker::MARKER_OUTCOME,
                &[(&secret.as_bytes(), Type::BYTEA), (&fence, Type::BOOL)],
            )
            .await?;
        let (committed, xid): (Option<bool>, Option<String>) = match row.first() {
            Some(r) => (r.get(0), r.get(1)),
            None => (None, None),
        };
        if committed == Some(true) {
            // A marker is written in the same transaction as the commit it marks, so its xid
            // committed. If not, someone with the owner's rights changed the markers.
            let xid = xid.as_deref().and_then(|x| x.parse::<u64>().ok());
            let status = match xid {
                Some(xid) => self.xact_status(&conn, xid).await?,
                None => XactStatus::Unknown,
            };
            if matches!(status, XactStatus::Aborted | XactStatus::InProgress) || xid.is_none() {
                super::ALARMS.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("twopc_atomicity_alarms_total").increment(1);
                tracing::error!(%gid, ?xid, ?status, "ATOMICITY ALARM: a one-phase marker says committed, but its transaction did not commit: the markers were changed outside the protocol");
                return Err(Error::FailedPrecondition(format!(
                    "ATOMICITY ALARM: the one-phase marker of {gid} says committed, but its transaction (xid {xid:?}) is {status:?} in PostgreSQL; the markers were changed outside the protocol, so the outcome must be checked by hand"
                )));
            }
        }
        Ok(committed)
    }

    async fn prune_one_phase_markers(&self, age: Duration) -> Result<u64, Error> {
        if !self.one_phase() {
            return Ok(0);
        }
        let conn = self.pooled().await?;
        let row = conn
            .query_typed(marker::PRUNE, &[(&age.as_secs_f64(), Type::FLOAT8)])
            .await?;
        Ok(row
            .first()
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .map_or(0, |n| n.max(0) as u64))
    }

    async fn prepared_older_than(&self, min_age: Duration) -> Result<Vec<PreparedBranch>, Error> {
        self.prepared_list(min_age).await
    }

    async fn saga_step(&self, call: &StepCall) -> Result<StepAnswer, Error> {
        if call.op == Op::Forget {
            return self.forget_step(call).await;
        }
        let conn = self.branch_conn().await?;
        let result = self.run_step(&conn, call).await;
        let answer = match result {
            Ok(answer) => {
                if !matches!(answer, StepAnswer::Applied(_) | StepAnswer::Null) {
                    // A repeat or a fence: nothing to keep.
                    let _ = conn.batch_execute("ROLLBACK").await;
                }
                Postgres::release(conn);
                return Ok(answer);
            }
            Err(e) => e,
        };
        let rolled_back = conn.batch_execute("ROLLBACK").await.is_ok();
        match rolled_back {
            true => Postgres::release(conn),
            false => drop(Object::take(conn)),
        }
        match answer {
            StepError::Statement(e) if !barrier::is_transient(&e) => {
                let (error, sqlstate) = match e {
                    SqlError::Failed { message, sqlstate } => (message, sqlstate),
                    other => (other.to_string(), None),
                };
                Ok(StepAnswer::Failed { error, sqlstate })
            }
            StepError::Barrier(why) => Err(Error::FailedPrecondition(why)),
            StepError::NoCompensationSecret => Err(Error::InvalidArgument(
                StepError::NoCompensationSecret.to_string(),
            )),
            e => Err(Error::Unavailable(format!(
                "saga {:?} step {:?} ({:?}) on PostgreSQL at {}: {e}; safe to send again",
                call.saga_id, call.step, call.op, self.target
            ))),
        }
    }
}

/// The xid8 of a 32-bit xid (as `pg_prepared_xacts` shows it), given the next xid8 (both as
/// text): the epoch is the next xid's, or one less if the low bits wrapped since.
fn full_xid(xid32: &str, next: &str) -> Option<u64> {
    let xid32: u64 = xid32.parse().ok()?;
    let next: u64 = next.parse().ok()?;
    let full = (next & !0xffff_ffff) | xid32;
    if full > next {
        full.checked_sub(1 << 32)
    } else {
        Some(full)
    }
}

/// PostgreSQL's message with its SQLSTATE, as a person wants to read it.
/// An error and what caused it, as one line: "error performing TLS handshake" alone does not say
/// that the certificate was not trusted.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        cause = c.source();
    }
    line
}

pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => format!("connection to PostgreSQL failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::full_xid;

    #[test]
    fn widens_a_32_bit_xid_with_the_right_epoch() {
        assert_eq!(full_xid("725", "730"), Some(725));
        let epoch1 = 1u64 << 32;
        assert_eq!(full_xid("5", &(epoch1 + 10).to_string()), Some(epoch1 + 5));
        // Prepared just before the low bits wrapped: previous epoch.
        assert_eq!(
            full_xid("4294967290", &(epoch1 + 10).to_string()),
            Some(4294967290)
        );
        assert_eq!(full_xid("x", "1"), None);
    }
}
