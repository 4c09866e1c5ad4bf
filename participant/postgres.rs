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
//! A lone branch commits in one phase: its COMMIT carries a marker row in
//! `twopc.one_phase_outcomes` (gid, committed), which is how a repeated CommitOnePhase learns
//! the truth after any crash; a gid with no marker is fenced with a `false` row, which waits for
//! a commit of the same gid still in flight (the primary key) and rules out any later one.

use super::database::{Database, LockWait, Prepared, PreparedBranch, XactStatus, settle_gone};
use super::error::Error;
use super::gid::Gid;
use super::pg_tls::{self, PgTls};
use super::sql::{self, SqlError};
use crate::proto;
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

/// Resets everything a session can carry from one branch to the next (what deadpool's
/// `RecyclingMethod::Clean` would run before every use; here it runs once, after a branch).
const CLEAN_SESSION: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
                             SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES;";

/// Where one-phase commits leave their markers. Created at start by the participant's own
/// role; if it cannot be, the participant commits every branch in two phases.
const MARKERS_DDL: &str = "CREATE SCHEMA IF NOT EXISTS twopc;      CREATE TABLE IF NOT EXISTS twopc.one_phase_outcomes (          gid text PRIMARY KEY,          committed boolean NOT NULL,          at timestamptz NOT NULL DEFAULT now())";

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
    /// For connections outside the pool (the health check's).
    config: tokio_postgres::Config,
    /// For messages: where PostgreSQL is, without the password.
    target: String,
    /// The marker table is there and ours to write: lone branches commit in one phase.
    one_phase: AtomicBool,
    /// TLS to PostgreSQL (`sslmode`), for the connections outside the pools too.
    tls: PgTls,
    /// What one Execute may carry and return (`--max-sql-bytes`, `--max-result-rows`, …).
    limits: sql::Limits,
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
        let pool = |size| {
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
            pool: pool(max_connections)?,
            protocol: pool(PROTOCOL_CONNECTIONS)?,
            branch_connections: max_connections,
            config,
            target,
            one_phase: AtomicBool::new(false),
            tls,
            limits: sql::Limits::default(),
            pids: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Creates the one-phase marker table if it is missing, and turns one-phase commit on if
    /// this role can write it. A failure is not fatal: every branch then takes two phases.
    pub async fn set_up_one_phase(&self) {
        let ready = async {
            let conn = self.pooled().await?;
            if let Err(e) = conn.batch_execute(MARKERS_DDL).await {
                // Another participant on the same database may have raced us to it.
                tracing::debug!(error = %describe(&e), "creating the one-phase marker table");
            }
            let row = conn
                .query_one(
                    "SELECT to_regclass('twopc.one_phase_outcomes') IS NOT NULL                      AND has_table_privilege('twopc.one_phase_outcomes', 'SELECT, INSERT, DELETE')",
                    &[],
                )
                .await?;
            Ok::<bool, Error>(row.get(0))
        }
        .await;
        match ready {
            Ok(true) => {
                self.one_phase.store(true, Ordering::SeqCst);
                tracing::info!(
                    "one-phase commit of lone branches: on (markers in twopc.one_phase_outcomes)"
                );
            }
            Ok(false) => tracing::warn!(
                "one-phase commit is off: this role cannot create or write twopc.one_phase_outcomes;                  every branch is committed in two phases"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "one-phase commit is off: could not set up its marker table")
            }
        }
    }

    /// Limits other than [`sql::Limits::default`] (`--max-sql-bytes`, `--max-result-rows`, …).
    pub fn with_limits(mut self, limits: sql::Limits) -> Self {
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
             CREATE SCHEMA twopc AUTHORIZATION twopc_participant; \
             (the last one for one-phase commit's markers), then use user=twopc_participant in --postgres. \
             Every participant on this database must use the same role: only the role that \
             prepared a transaction may commit it. To run as {role} anyway, pass --allow-superuser.",
            target = self.target
        )))
    }

    /// Phase 1 on the branch's connection. On `Err` the connection's state is unknown, so it
    /// is detached from the pool.
    async fn prepare_on(&self, conn: Object, gid: &Gid) -> Result<(Prepared, Object), Error> {
        // One round trip: the xid (NULL if the branch wrote nothing), the PREPARE, and the
        // check that it really prepared (after a failed statement PREPARE rolls back without
        // an error). The statements run in order and stop at the first error.
        let gid_literal = gid.literal();
        let batch = format!(
            "SELECT pg_current_xact_id_if_assigned()::text; \
             PREPARE TRANSACTION {gid_literal}; \
             SELECT count(*) FROM pg_prepared_xacts WHERE gid = {gid_literal}"
        );
        crate::failpoint!("participant::before_prepare");
        let result = conn.simple_query(&batch).await;
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
            let (Some(xid_row), Some(count_row)) = (rows.first(), rows.last()) else {
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
            Ok(p) => Ok((p, conn)),
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
}

impl Database for Postgres {
    type Conn = Object;
    type Cancel = tokio_postgres::CancelToken;

    async fn conn(&self) -> Result<Object, Error> {
        let conn = self.branch_conn().await?;
        let id = Object::id(&conn);
        if !self.pids.lock().unwrap().contains_key(&id) {
            let pid: i32 = conn.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
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

    fn limits(&self) -> sql::Limits {
        self.limits
    }

    async fn begin(&self, conn: &Object) -> Result<(), SqlError> {
        Ok(conn.batch_execute("BEGIN").await?)
    }

    async fn execute(
        &self,
        conn: &Object,
        sql: &str,
        params: &[proto::Value],
        begin: bool,
    ) -> Result<proto::ExecuteResponse, SqlError> {
        sql::execute(conn, sql, params, begin, &self.limits).await
    }

    async fn prepare(&self, conn: Object, gid: &Gid) -> Result<Prepared, Error> {
        let (prepared, conn) = self.prepare_on(conn, gid).await?;
        Postgres::release(conn);
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
        gid: &Gid,
        forget: &[Gid],
    ) -> Result<OnePhaseOutcome, Error> {
        // One round trip. The xid (NULL if the branch wrote nothing, then no marker either);
        // the session's own role back (the client may have switched to one that cannot write
        // the markers); the marker; the markers the coordinator is done with; COMMIT. The
        // statements stop at the first error, and an error before or at COMMIT rolls it all
        // back.
        let lit = gid.literal();
        let forget_sql = if forget.is_empty() {
            String::new()
        } else {
            let gids: Vec<String> = forget.iter().map(Gid::literal).collect();
            format!(
                "DELETE FROM twopc.one_phase_outcomes WHERE gid IN ({}); ",
                gids.join(", ")
            )
        };
        let batch = format!(
            "SELECT pg_current_xact_id_if_assigned()::text;              SET SESSION AUTHORIZATION DEFAULT; RESET ROLE;              INSERT INTO twopc.one_phase_outcomes (gid, committed)                SELECT {lit}, true WHERE pg_current_xact_id_if_assigned() IS NOT NULL;              {forget_sql}COMMIT"
        );
        crate::failpoint!("participant::before_one_phase_commit");
        let result = conn.simple_query(&batch).await;
        crate::failpoint!("participant::after_one_phase_commit");
        match result {
            Ok(messages) => {
                let wrote = messages.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).is_some()),
                    _ => None,
                });
                Self::release(conn);
                Ok(OnePhaseOutcome::Committed {
                    read_only: !wrote.unwrap_or(false),
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

    async fn one_phase_outcome(&self, gid: &Gid, fence: bool) -> Result<Option<bool>, Error> {
        let conn = self.pooled().await?;
        let gid = gid.to_string();
        if fence {
            // Waits on the primary key for a commit of this gid still in flight; afterwards
            // none can follow.
            conn.execute(
                "INSERT INTO twopc.one_phase_outcomes (gid, committed) VALUES ($1, false)                  ON CONFLICT (gid) DO NOTHING",
                &[&gid],
            )
            .await?;
        }
        let row = conn
            .query_opt(
                "SELECT committed FROM twopc.one_phase_outcomes WHERE gid = $1",
                &[&gid],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn prune_one_phase_markers(&self, age: Duration) -> Result<u64, Error> {
        if !self.one_phase() {
            return Ok(0);
        }
        let conn = self.pooled().await?;
        Ok(conn
            .execute(
                "DELETE FROM twopc.one_phase_outcomes WHERE at < now() - make_interval(secs => $1)",
                &[&age.as_secs_f64()],
            )
            .await?)
    }

    async fn prepared_older_than(&self, min_age: Duration) -> Result<Vec<PreparedBranch>, Error> {
        self.prepared_list(min_age).await
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
