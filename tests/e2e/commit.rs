//! Committing across databases: the happy path, idempotent retries, and values on the wire.

use crate::support;

use support::{System, admin_scalar, int, outcome, text};
use twopc::proto::{self, Outcome, TxnState, value::Kind};

const ACCOUNTS: &str = "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
                        INSERT INTO acct VALUES (1, 100), (2, 100);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_participant_commit_is_visible_in_both_databases() {
    let sys = System::start(2).await;
    sys.setup_sql(ACCOUNTS).await;

    let txn = sys.begin().await;
    let debit = sys
        .exec(
            0,
            &txn,
            "UPDATE acct SET bal = bal - $1 WHERE id = $2 RETURNING bal",
            vec![int(30), int(1)],
        )
        .await
        .unwrap();
    sys.exec(
        1,
        &txn,
        "UPDATE acct SET bal = bal + $1 WHERE id = $2",
        vec![int(30), int(1)],
    )
    .await
    .unwrap();
    let resp = sys.commit(&txn).await;

    assert_eq!(debit.rows_affected, 1);
    assert_eq!(debit.columns, vec!["bal"]);
    assert_eq!(debit.rows[0].values[0].kind, Some(Kind::IntValue(70)));
    assert_eq!(outcome(resp.outcome), Outcome::Committed);
    assert!(!resp.branches_pending);
    // Commit returned after phase 2: the writes are readable at once.
    assert_eq!(sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await, 70);
    assert_eq!(
        sys.scalar(1, "SELECT bal FROM acct WHERE id = 1").await,
        130
    );
    let t = sys.get(&txn).await;
    assert_eq!(t.state(), TxnState::Committed);
    assert_eq!(t.branches.len(), 2);
    assert!(
        t.branches
            .iter()
            .all(|b| b.state() == proto::BranchState::Committed && b.xid > 0)
    );
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_abort_repeat_the_recorded_outcome() {
    let sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    let txn = sys.begin().await;
    sys.exec(0, &txn, "UPDATE acct SET bal = 0 WHERE id = 1", vec![])
        .await
        .unwrap();

    let first = sys.commit(&txn).await;
    let again = sys.commit(&txn).await;
    let abort_after = sys.abort(&txn).await;

    assert_eq!(outcome(first.outcome), Outcome::Committed);
    assert_eq!(outcome(again.outcome), Outcome::Committed);
    assert_eq!(outcome(abort_after.outcome), Outcome::Committed);
    assert_eq!(sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await, 0);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_of_one_txn_agree() {
    let sys = System::start(2).await;
    sys.setup_sql(ACCOUNTS).await;
    let txn = sys.begin().await;
    sys.exec(0, &txn, "UPDATE acct SET bal = 1 WHERE id = 1", vec![])
        .await
        .unwrap();
    sys.exec(1, &txn, "UPDATE acct SET bal = 1 WHERE id = 1", vec![])
        .await
        .unwrap();

    let (a, b, c) = tokio::join!(sys.commit(&txn), sys.commit(&txn), sys.commit(&txn));

    for r in [a, b, c] {
        assert_eq!(outcome(r.outcome), Outcome::Committed);
    }
    assert_eq!(sys.scalar(1, "SELECT bal FROM acct WHERE id = 1").await, 1);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_and_empty_transactions_commit_without_prepared_branches() {
    let sys = System::start(2).await;
    sys.setup_sql(ACCOUNTS).await;
    let reads = sys.begin().await;
    sys.exec(0, &reads, "SELECT bal FROM acct", vec![])
        .await
        .unwrap();
    sys.exec(1, &reads, "SELECT bal FROM acct", vec![])
        .await
        .unwrap();
    let empty = sys.begin().await;

    let r = sys.commit(&reads).await;
    let e = sys.commit(&empty).await;

    assert_eq!(outcome(r.outcome), Outcome::Committed);
    assert_eq!(outcome(e.outcome), Outcome::Committed);
    let t = sys.get(&reads).await;
    assert!(
        t.branches
            .iter()
            .all(|b| b.state() == proto::BranchState::ReadOnly)
    );
    assert_eq!(sys.get(&empty).await.state(), TxnState::Committed);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_with_their_types() {
    let sys = System::start(1).await;
    let txn = sys.begin().await;
    let v = |k| proto::Value { kind: Some(k) };
    let resp = sys
        .exec(
            0,
            &txn,
            "SELECT $1::int8, $2::float8, $3::bool, $4::bytea, $5::text, NULL::int, $6::numeric, $7::date, $8::int4 + 1, 'x'::varchar",
            vec![
                int(-7),
                v(Kind::DoubleValue(2.5)),
                v(Kind::BoolValue(true)),
                v(Kind::BytesValue(vec![0, 1, 255])),
                text("it's \"quoted\""),
                text("12.340"),
                text("2026-11-23"),
                int(41),
            ],
        )
        .await
        .unwrap();
    sys.commit(&txn).await;

    let got: Vec<Kind> = resp.rows[0]
        .values
        .iter()
        .map(|v| v.kind.clone().unwrap())
        .collect();
    assert_eq!(
        got,
        vec![
            Kind::IntValue(-7),
            Kind::DoubleValue(2.5),
            Kind::BoolValue(true),
            Kind::BytesValue(vec![0, 1, 255]),
            Kind::TextValue("it's \"quoted\"".into()),
            Kind::NullValue(true),
            Kind::TextValue("12.340".into()),
            Kind::TextValue("2026-11-23".into()),
            Kind::IntValue(42),
            Kind::TextValue("x".into()),
        ]
    );
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_rows_of_other_types_read_as_psql_prints_them() {
    let sys = System::start(1).await;
    sys.setup_sql("CREATE TABLE prices (id int PRIMARY KEY, price numeric(6, 3))")
        .await;
    // Many rows of many types, NULLs among them.
    let columns = "g::numeric / 7, timestamptz '2026-11-24 10:00+00' + g * interval '1 min', \
                   md5(g::text)::uuid, jsonb_build_object('g', g), ARRAY[g::text, NULL], \
                   g * interval '1 sec', CASE WHEN g % 3 = 0 THEN NULL ELSE g::numeric END";
    let query = format!("SELECT {columns} FROM generate_series(1, 3000) g ORDER BY g");
    let txn = sys.begin().await;

    let resp = sys.exec(0, &txn, &query, vec![]).await.unwrap();
    // Statements that cannot be wrapped to print in place: printed afterwards, and the branch
    // is unharmed by the attempt.
    let semicolon = sys
        .exec(0, &txn, "SELECT 2.50::numeric; -- trailing", vec![])
        .await
        .unwrap();
    let returning = sys
        .exec(
            0,
            &txn,
            "INSERT INTO prices VALUES (1, 9.990) RETURNING price, interval '90 min'",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(outcome(sys.commit(&txn).await.outcome), Outcome::Committed);

    assert_eq!(
        semicolon.rows[0].values[0].kind,
        Some(Kind::TextValue("2.50".into()))
    );
    assert_eq!(
        returning.rows[0]
            .values
            .iter()
            .map(|v| v.kind.clone())
            .collect::<Vec<_>>(),
        vec![
            Some(Kind::TextValue("9.990".into())),
            Some(Kind::TextValue("01:30:00".into()))
        ]
    );
    assert_eq!(sys.scalar(0, "SELECT count(*) FROM prices").await, 1);

    // What PostgreSQL itself prints, cell by cell.
    let pg = sys.pgs[0].client().await.unwrap();
    let printed = format!(
        "SELECT ARRAY[{}] FROM ({query}) q(a, b, c, d, e, f, h)",
        ["a", "b", "c", "d", "e", "f", "h"]
            .map(|c| format!("{c}::text"))
            .join(", ")
    );
    let expected: Vec<Vec<Option<String>>> = pg
        .query(&printed, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let got = as_text(&resp);
    assert_eq!(got.len(), 3000);
    assert_eq!(got, expected);
    sys.assert_nothing_prepared().await;
}

/// Every cell as text, as the assertions compare it with what PostgreSQL prints. Integers
/// come back native (a domain over one too: PostgreSQL describes the column by its base type).
fn as_text(resp: &proto::ExecuteResponse) -> Vec<Vec<Option<String>>> {
    resp.rows
        .iter()
        .map(|r| {
            r.values
                .iter()
                .map(|v| match v.kind.clone().unwrap() {
                    Kind::TextValue(t) => Some(t),
                    Kind::IntValue(i) => Some(i.to_string()),
                    Kind::NullValue(_) => None,
                    other => panic!("a printed type came back as {other:?}"),
                })
                .collect()
        })
        .collect()
}

/// Statements users write come back as psql prints them and never doom the branch: records
/// (anonymous and named), arrays of them, enums, domains and ranges, from parenthesised
/// queries, `WITH`, `INSERT … RETURNING`, and statements that cannot be wrapped to print in
/// place (a `WITH` holding an `UPDATE`, a trailing `;`, `FETCH`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_users_write_read_as_psql_prints_them() {
    let sys = System::start(1).await;
    sys.setup_sql(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN positive AS int CHECK (VALUE > 0);
         CREATE TYPE pair AS (a int, b text);
         CREATE TABLE things (id int PRIMARY KEY, m mood, p pair, r int4range, d positive,
                              tags text[]);",
    )
    .await;
    // Each statement sent through Execute, and a query that has PostgreSQL print the same.
    let cases = [
        (
            r#"(SELECT ROW(1, 'a b', NULL::int, '', 'say "hi" \o/'),
                       ARRAY[ROW(1, 'a b'), NULL, ROW(2, NULL)])"#,
            r#"SELECT ROW(1, 'a b', NULL::int, '', 'say "hi" \o/')::text,
                      ARRAY[ROW(1, 'a b'), NULL, ROW(2, NULL)]::text"#,
        ),
        (
            "WITH t AS (SELECT 2 AS x)
             SELECT ROW(x, 'happy'::mood, '[1,5)'::int4range), 'ok'::mood, 7::positive FROM t",
            "SELECT ROW(2, 'happy'::mood, '[1,5)'::int4range)::text, 'ok', '7'",
        ),
        (
            "INSERT INTO things VALUES (1, 'happy', ROW(2, 'b c'), '[1,5)', 3, ARRAY['a', 'b c'])
             RETURNING m, p, r, d, tags, ROW(id, m, p)",
            "SELECT 'happy', ROW(2, 'b c')::pair::text, '[1,5)'::int4range::text, '3',
                    ARRAY['a', 'b c']::text, ROW(1, 'happy'::mood, ROW(2, 'b c')::pair)::text",
        ),
        (
            "WITH moved AS (UPDATE things SET d = d + 1 RETURNING id, d, p, tags)
             SELECT ROW(id, moved.d), ARRAY[ROW(moved.p, moved.tags)], m
             FROM moved JOIN things USING (id)",
            "SELECT ROW(1, 4::positive)::text,
                    ARRAY[ROW(ROW(2, 'b c')::pair, ARRAY['a', 'b c'])]::text, 'happy'",
        ),
        (
            r#"SELECT ARRAY[[ROW(1, 'a')], [ROW(2, 'b c')]], ROW(ROW(NULL, '{x}'), 1.50::numeric),
                      '[0:1]={"(1,x)","(2,y)"}'::pair[]; -- a trailing ; is not wrapped"#,
            r#"SELECT ARRAY[[ROW(1, 'a')], [ROW(2, 'b c')]]::text,
                      ROW(ROW(NULL, '{x}'), 1.50::numeric)::text,
                      '[0:1]={"(1,x)","(2,y)"}'::pair[]::text"#,
        ),
        (
            "FETCH ALL FROM c",
            "SELECT ROW(g, g || ' x')::text FROM generate_series(1, 3) g",
        ),
    ];
    let txn = sys.begin().await;
    sys.exec(
        0,
        &txn,
        "DECLARE c CURSOR FOR SELECT ROW(g, g || ' x') FROM generate_series(1, 3) g",
        vec![],
    )
    .await
    .unwrap();

    let mut got = Vec::new();
    for (sql, _) in &cases {
        let resp = sys.exec(0, &txn, sql, vec![]).await;
        got.push(as_text(&resp.unwrap_or_else(|e| panic!("{sql}: {e:?}"))));
    }
    let parenthesised = sys.exec(0, &txn, "(SELECT 1)", vec![]).await.unwrap();
    let commit = sys.commit(&txn).await;

    assert_eq!(outcome(commit.outcome), Outcome::Committed);
    assert_eq!(
        parenthesised.rows[0].values[0].kind,
        Some(Kind::IntValue(1))
    );
    let pg = sys.pgs[0].client().await.unwrap();
    for ((sql, printed), got) in cases.iter().zip(got) {
        let want: Vec<Vec<Option<String>>> = pg
            .query(*printed, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (0..r.len()).map(|i| r.get(i)).collect())
            .collect();
        assert_eq!(got, want, "{sql}");
    }
    assert_eq!(sys.scalar(0, "SELECT d::int8 FROM things").await, 4);
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_do_not_leak_from_one_branch_to_the_next() {
    let sys = System::start(1).await;
    let mut seen = Vec::new();

    for _ in 0..20 {
        let txn = sys.begin().await;
        let resp = sys.exec(0, &txn, "SHOW search_path", vec![]).await.unwrap();
        seen.push(resp.rows[0].values[0].kind.clone());
        // Session-level, not LOCAL: once committed it outlives the transaction on this
        // connection, and it needs a write so the branch is prepared, not read-only.
        sys.exec(0, &txn, "SET search_path TO leaked", vec![])
            .await
            .unwrap();
        sys.exec(
            0,
            &txn,
            "CREATE TABLE IF NOT EXISTS public.scratch (x int)",
            vec![],
        )
        .await
        .unwrap();
        assert_eq!(outcome(sys.commit(&txn).await.outcome), Outcome::Committed);
    }

    for s in seen {
        assert_eq!(s, Some(Kind::TextValue("\"$user\", public".into())));
    }
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_branch_commits_in_one_phase_and_its_marker_is_forgotten_by_the_next() {
    let sys = System::start(1).await;
    sys.setup_sql(ACCOUNTS).await;
    // A client that switches to a role of its own: the marker is still written as the
    // participant's role.
    sys.admin_sql("CREATE ROLE app NOLOGIN; GRANT app TO twopc_participant")
        .await;
    sys.setup_sql(
        "GRANT SELECT, UPDATE ON acct TO app;
         CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (parent int REFERENCES parent DEFERRABLE INITIALLY DEFERRED);
         GRANT SELECT, INSERT ON child TO app;",
    )
    .await;
    // Markers carry no gid (only the coordinator can name one), so they are counted: the
    // superuser's view, as the participant's role may not read them.
    let markers = || async {
        admin_scalar(
            &sys.pgs[0],
            "SELECT count(*) FROM twopc.one_phase_markers WHERE committed",
        )
        .await
    };

    let first = sys.begin().await;
    sys.exec(0, &first, "SET ROLE app", vec![]).await.unwrap();
    sys.exec(
        0,
        &first,
        "UPDATE acct SET bal = bal - 1 WHERE id = 1",
        vec![],
    )
    .await
    .unwrap();
    let first_resp = sys.commit(&first).await;
    let after_first = markers().await;
    let second = sys.begin().await;
    sys.exec(
        0,
        &second,
        "UPDATE acct SET bal = bal - 1 WHERE id = 2",
        vec![],
    )
    .await
    .unwrap();
    let second_resp = sys.commit(&second).await;
    let after_second = markers().await;
    let refused = sys.begin().await;
    sys.exec(0, &refused, "INSERT INTO child VALUES (42)", vec![])
        .await
        .unwrap();
    let refused_resp = sys.commit(&refused).await;

    assert_eq!(outcome(first_resp.outcome), Outcome::Committed);
    assert_eq!(outcome(second_resp.outcome), Outcome::Committed);
    assert_eq!(
        sys.scalar(0, "SELECT sum(bal)::bigint FROM acct").await,
        198
    );
    let branch = &sys.get(&first).await.branches[0];
    assert_eq!(branch.state(), proto::BranchState::Committed);
    assert_eq!(branch.xid, 0, "never prepared, so no vote and no xid");
    assert_eq!(after_first, 1, "the commit left its marker");
    assert_eq!(
        after_second, 1,
        "the first forgotten in the next one-phase commit, which left its own"
    );
    assert_eq!(outcome(refused_resp.outcome), Outcome::Aborted);
    assert!(
        refused_resp.reason.contains("foreign key"),
        "the deferred constraint's error: {}",
        refused_resp.reason
    );
    assert_eq!(sys.scalar(0, "SELECT count(*) FROM child").await, 0);
    assert_eq!(markers().await, 1, "an aborted commit leaves no marker");
    sys.assert_nothing_prepared().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_kept_prepared_follows_a_schema_change() {
    let sys = System::start(1).await;
    sys.setup_sql("CREATE TABLE shape (x int); INSERT INTO shape VALUES (1);")
        .await;
    let system = &sys;
    let read = |txn: String| async move {
        let r = system.exec(0, &txn, "SELECT * FROM shape", vec![]).await;
        system.abort(&txn).await;
        r
    };
    for _ in 0..3 {
        let first = read(sys.begin().await).await.unwrap();
        assert_eq!(first.columns, vec!["x"]);
    }

    sys.setup_sql("ALTER TABLE shape ADD COLUMN y int DEFAULT 2")
        .await;
    // A connection that kept the old statement fails it once ("cached plan must not change
    // result type") and starts afresh; how many connections kept it is up to the pool.
    let mut stale = 0;
    let after = loop {
        match read(sys.begin().await).await {
            Ok(r) => break r,
            Err(status) => {
                assert!(
                    status.message().contains("cached plan"),
                    "{}",
                    status.message()
                );
                stale += 1;
                assert!(stale <= 8, "the cache is not being emptied");
            }
        }
    };

    assert_eq!(after.columns, vec!["x", "y"]);
    for sql in ["DEALLOCATE ALL", "EXECUTE s0", "PREPARE mine AS SELECT 1"] {
        let refused = sys.exec(0, &sys.begin().await, sql, vec![]).await;
        assert_eq!(
            refused.unwrap_err().code(),
            tonic::Code::InvalidArgument,
            "{sql}"
        );
    }
    sys.assert_nothing_prepared().await;
}
