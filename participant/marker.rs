//! One-phase commit's markers in PostgreSQL, out of the clients' reach.
//!
//! A lone branch commits in one phase, and its COMMIT carries a marker row so that a repeated
//! CommitOnePhase can learn the truth after any crash. Every client's SQL runs as the
//! participant's own role, so a marker that role could write, a client could forge (a `true`
//! row makes a lost commit answer COMMITTED), plant (a `false` row aborts someone else's
//! transaction) or delete (a committed transaction then answers ABORTED). Hence:
//!
//! - **Nobody but the owner writes the table.** `twopc.one_phase_markers` and the schema
//!   belong to a role of their own, [`OWNER`] (NOLOGIN, created by [`setup_sql`], run once by a
//!   superuser). The participant's role may only call three `SECURITY DEFINER` functions, which
//!   pin their `search_path`: no UPDATE, no DELETE, no DDL on the markers, whatever SQL a
//!   client sends.
//! - **A marker is found by a secret, not by its gid.** The functions take the coordinator's
//!   marker secret (`proto::marker`) as a bound parameter (never in the statement text, which
//!   `pg_stat_activity` shows to the role's other sessions) and keep only its SHA-256. So the
//!   functions a client can call are harmless to it: a fence or a forget under a secret it
//!   made up addresses no real marker, and `prune` never goes below [`RETENTION_FLOOR_S`].
//!
//! At start [`check`] tells whether this database gives that guarantee to this role; if not,
//! one-phase commit is off (every branch then takes two phases) and the participant says why
//! and how to fix it.

/// The role that owns the markers. Never granted to the participant's role: a member could
/// `SET ROLE` to it, and so could every client.
pub const OWNER: &str = "twopc_markers";

/// `twopc.prune_markers` deletes nothing younger, whoever calls it: the participant's
/// retention (`MARKER_RETENTION`, 7 days), past the horizon after which a missing marker is no
/// longer taken to mean "did not commit" (6 days).
pub const RETENTION_FLOOR_S: u64 = 7 * 24 * 3600;

/// The COMMIT's marker and the forgotten ones, in the branch's own transaction: returns the
/// branch's xid8 as text, or NULL if it wrote nothing (then no marker is kept). `$1` secret,
/// `$2` the secrets to forget.
pub const COMMIT_MARKER: &str =
    "SELECT twopc.commit_marker($1::pg_catalog.bytea, $2::pg_catalog.bytea[])::pg_catalog.text";

/// A marker by its secret (`$1`), fenced first if `$2` (a `false` marker, waiting for a commit
/// under the same secret still in flight): committed, and its xid8.
pub const MARKER_OUTCOME: &str = "SELECT marked_committed, marked_xid::pg_catalog.text \
     FROM twopc.marker_outcome($1::pg_catalog.bytea, $2::pg_catalog.bool)";

/// Deletes markers older than `$1` seconds (never younger than [`RETENTION_FLOOR_S`]).
pub const PRUNE: &str = "SELECT twopc.prune_markers($1::pg_catalog.float8)";

/// What a superuser runs once in the participant's database so that one-phase commit is on
/// for `role`, the participant's role, and saga steps have their barrier (`barrier.rs`). Idempotent: run again after an upgrade, it replaces the
/// functions and moves an earlier version's marker table (owned by `role`) out of its reach.
pub fn setup_sql(role: &str) -> String {
    let role = quote_ident(role);
    let markers = format!(
        r#"-- twopc: one-phase commit's markers, out of the reach of the SQL clients run through the
-- participant. Run once per database as a superuser, e.g.
--   participant --print-setup-sql --postgres "user=<role> dbname=<db>" | psql -d <db>
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{OWNER}') THEN
    CREATE ROLE {OWNER} NOLOGIN;
  END IF;
END
$$;
CREATE SCHEMA IF NOT EXISTS twopc AUTHORIZATION {OWNER};
ALTER SCHEMA twopc OWNER TO {OWNER};
REVOKE ALL ON SCHEMA twopc FROM PUBLIC;
GRANT USAGE ON SCHEMA twopc TO {role};
-- An earlier version kept its markers here, writable by the participant's role; nothing
-- reads them any more.
DO $$
BEGIN
  IF pg_catalog.to_regclass('twopc.one_phase_outcomes') IS NOT NULL THEN
    ALTER TABLE twopc.one_phase_outcomes OWNER TO {OWNER};
    REVOKE ALL ON TABLE twopc.one_phase_outcomes FROM PUBLIC;
  END IF;
END
$$;

-- No gid: anyone who may call the functions could write any gid beside a made-up key, and a
-- column that can lie is a trap for a person resolving a transaction by hand.
CREATE TABLE IF NOT EXISTS twopc.one_phase_markers (
    -- SHA-256 of the coordinator's marker secret: only the coordinator can name a marker.
    key bytea PRIMARY KEY,
    -- true: the branch's COMMIT carried it. false: a fence, "did not commit", final.
    committed boolean NOT NULL,
    -- The committing transaction (NULL for a fence).
    xid xid8,
    at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE twopc.one_phase_markers OWNER TO {OWNER};
REVOKE ALL ON TABLE twopc.one_phase_markers FROM PUBLIC;

-- In the branch's transaction, just before its COMMIT: the marker (if it wrote anything) and
-- the deletion of markers the coordinator is done with.
CREATE OR REPLACE FUNCTION twopc.commit_marker(marker_secret bytea, forget_secrets bytea[])
RETURNS xid8 LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
  branch_xid xid8 := pg_current_xact_id_if_assigned();
BEGIN
  IF octet_length(marker_secret) < 16 THEN
    RAISE EXCEPTION 'a one-phase marker secret is at least 16 bytes';
  END IF;
  IF cardinality(forget_secrets) > 0 AND current_setting('transaction_read_only') = 'off' THEN
    DELETE FROM twopc.one_phase_markers
     WHERE key = ANY (ARRAY(SELECT sha256(s) FROM unnest(forget_secrets) AS s));
  END IF;
  IF branch_xid IS NULL THEN
    RETURN NULL;
  END IF;
  INSERT INTO twopc.one_phase_markers (key, committed, xid)
  VALUES (sha256(marker_secret), true, branch_xid);
  RETURN branch_xid;
END
$f$;

-- A repeated CommitOnePhase: the marker, after a fence if asked (waits on the primary key for
-- a commit under the same secret still in flight; afterwards none can follow).
CREATE OR REPLACE FUNCTION twopc.marker_outcome(marker_secret bytea, fence boolean,
    OUT marked_committed boolean, OUT marked_xid xid8)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  IF octet_length(marker_secret) < 16 THEN
    RAISE EXCEPTION 'a one-phase marker secret is at least 16 bytes';
  END IF;
  IF fence THEN
    INSERT INTO twopc.one_phase_markers (key, committed)
    VALUES (sha256(marker_secret), false)
    ON CONFLICT (key) DO NOTHING;
  END IF;
  SELECT m.committed, m.xid INTO marked_committed, marked_xid
    FROM twopc.one_phase_markers AS m WHERE m.key = sha256(marker_secret);
END
$f$;

-- Markers nobody will ask about again; never younger than {floor} s, whoever asks.
CREATE OR REPLACE FUNCTION twopc.prune_markers(older_than_s float8)
RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
  WITH gone AS (
    DELETE FROM twopc.one_phase_markers
     WHERE at < now() - make_interval(secs => greatest(older_than_s, {floor}))
    RETURNING 1)
  SELECT count(*) FROM gone
$f$;

ALTER FUNCTION twopc.commit_marker(bytea, bytea[]) OWNER TO {OWNER};
ALTER FUNCTION twopc.marker_outcome(bytea, boolean) OWNER TO {OWNER};
ALTER FUNCTION twopc.prune_markers(float8) OWNER TO {OWNER};
REVOKE ALL ON FUNCTION twopc.commit_marker(bytea, bytea[]),
    twopc.marker_outcome(bytea, boolean), twopc.prune_markers(float8) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION twopc.commit_marker(bytea, bytea[]),
    twopc.marker_outcome(bytea, boolean), twopc.prune_markers(float8) TO {role};
"#,
        floor = RETENTION_FLOOR_S,
    );
    markers + &super::barrier::setup_sql(&role, OWNER)
}

/// What the participant's role can do to the markers, as [`CHECK`] reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub superuser: bool,
    pub table_exists: bool,
    /// The table's owner; `None` without a table.
    pub owner: Option<String>,
    /// The role is the owner, or a member of it (so could `SET ROLE` to it).
    pub owns: bool,
    /// INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES or TRIGGER on the table.
    pub writes_table: bool,
    /// CREATE on schema `twopc`.
    pub creates_in_schema: bool,
    /// Each of the three functions exists, is SECURITY DEFINER, belongs to the table's owner,
    /// and this role may EXECUTE it.
    pub functions_ready: bool,
    /// An earlier version's `twopc.one_phase_outcomes` that this role still owns.
    pub legacy_table_owned: bool,
}

/// One row of booleans and the owner: what [`Access`] holds. Run on a protocol connection,
/// whose `search_path` is pinned (`postgres.rs`).
pub const CHECK: &str = "
    WITH t AS (SELECT pg_catalog.to_regclass('twopc.one_phase_markers') AS oid),
         f AS (SELECT p.oid, p.prosecdef, p.proowner
                 FROM (VALUES ('twopc.commit_marker(bytea,bytea[])'),
                              ('twopc.marker_outcome(bytea,boolean)'),
                              ('twopc.prune_markers(float8)')) AS v(sig)
                 LEFT JOIN pg_catalog.pg_proc AS p
                   ON p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure(v.sig))
    SELECT pg_catalog.current_setting('is_superuser') OPERATOR(pg_catalog.=) 'on',
           t.oid IS NOT NULL,
           c.relowner::pg_catalog.regrole::pg_catalog.text,
           coalesce(pg_catalog.pg_has_role(c.relowner, 'MEMBER'), false),
           coalesce(pg_catalog.has_table_privilege(t.oid,
               'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER'), false),
           coalesce(pg_catalog.has_schema_privilege(
               (SELECT n.oid FROM pg_catalog.pg_namespace AS n
                 WHERE n.nspname OPERATOR(pg_catalog.=) 'twopc'), 'CREATE'), false),
           (SELECT pg_catalog.bool_and(f.oid IS NOT NULL AND f.prosecdef
                       AND f.proowner OPERATOR(pg_catalog.=) c.relowner
                       AND pg_catalog.has_function_privilege(f.oid, 'EXECUTE'))
              FROM f),
           coalesce((SELECT pg_catalog.pg_has_role(l.relowner, 'MEMBER')
                       FROM pg_catalog.pg_class AS l
                      WHERE l.oid OPERATOR(pg_catalog.=)
                            pg_catalog.to_regclass('twopc.one_phase_outcomes')), false)
    FROM t LEFT JOIN pg_catalog.pg_class AS c ON c.oid OPERATOR(pg_catalog.=) t.oid";

impl Access {
    /// Why the markers cannot be trusted with this role (one-phase commit must stay off), or
    /// `None` if they can.
    pub fn refusal(&self) -> Option<String> {
        let owner = self.owner.as_deref().unwrap_or(OWNER);
        if self.superuser {
            return Some(
                "the role is a superuser, whose clients' SQL could rewrite any marker".into(),
            );
        }
        if !self.table_exists {
            return Some("twopc.one_phase_markers does not exist".into());
        }
        if self.owns {
            return Some(format!(
                "the role owns twopc.one_phase_markers (or is a member of its owner {owner}), so its clients' SQL could write markers"
            ));
        }
        if self.writes_table {
            return Some(
                "the role may write twopc.one_phase_markers directly, and so may its clients' SQL"
                    .into(),
            );
        }
        if self.creates_in_schema {
            return Some(
                "the role may create objects in schema twopc, and so may its clients' SQL".into(),
            );
        }
        if !self.functions_ready {
            return Some(format!(
                "the functions twopc.commit_marker, twopc.marker_outcome and twopc.prune_markers are missing, not SECURITY DEFINER of {owner}, or not executable by the role"
            ));
        }
        None
    }
}

/// Whether a client's statement failed because it reached for the markers: PostgreSQL refused
/// it (`42501`, permission denied) on the marker schema or one of its tables. Nothing a
/// client's own work needs is there, so it is an attempt on the protocol, worth an alarm.
pub fn is_refused_reach(sqlstate: &str, message: &str) -> bool {
    sqlstate == "42501"
        && ["one_phase_markers", "one_phase_outcomes", "schema twopc"]
            .iter()
            .any(|name| message.contains(name))
}

/// `ident` as a PostgreSQL identifier, quoted.
fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Access {
        Access {
            table_exists: true,
            owner: Some(OWNER.into()),
            functions_ready: true,
            ..Access::default()
        }
    }

    #[test]
    fn markers_are_trusted_only_when_the_role_cannot_write_them() {
        assert_eq!(ready().refusal(), None);
        let refused = |a: Access| a.refusal().expect("must be refused");
        assert!(refused(Access::default()).contains("does not exist"));
        assert!(
            refused(Access {
                superuser: true,
                ..ready()
            })
            .contains("superuser")
        );
        assert!(
            refused(Access {
                owns: true,
                ..ready()
            })
            .contains("owns")
        );
        assert!(
            refused(Access {
                writes_table: true,
                ..ready()
            })
            .contains("write")
        );
        assert!(
            refused(Access {
                creates_in_schema: true,
                ..ready()
            })
            .contains("create")
        );
        assert!(
            refused(Access {
                functions_ready: false,
                ..ready()
            })
            .contains("SECURITY DEFINER")
        );
    }

    #[test]
    fn a_refused_reach_for_the_markers_is_told_from_other_refusals() {
        assert!(is_refused_reach(
            "42501",
            "ERROR permission denied for table one_phase_markers (SQLSTATE 42501)"
        ));
        assert!(is_refused_reach(
            "42501",
            "permission denied for schema twopc"
        ));
        assert!(!is_refused_reach(
            "42501",
            "permission denied for table acct"
        ));
        assert!(!is_refused_reach("23505", "one_phase_markers_pkey"));
    }

    #[test]
    fn the_setup_quotes_the_role_it_grants_to() {
        let sql = setup_sql("app\"; DROP TABLE x; --");
        assert!(sql.contains(r#"TO "app""; DROP TABLE x; --";"#));
        assert!(!sql.contains("TO app\""));
    }
}
