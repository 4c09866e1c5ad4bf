//! Safe on a network: mutual TLS on every connection (the client's, the participants' to their
//! coordinator, the coordinator's to its participants, the operator's tool), and bearer tokens
//! whose role decides what a caller may do.

use crate::support;

use support::{System, TestPki, outcome, twopcctl};
use tonic::Code;
use twopc::process::auth::Bearer;
use twopc::process::tls::Tls;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
use twopc::proto::{self, Outcome};

const ACCOUNTS: &str = "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
                        INSERT INTO acct VALUES (1, 100), (2, 100);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_commits_with_mutual_tls_and_tokens_on_every_connection() {
    let sys = System::start_secure(2).await;
    sys.setup_sql(ACCOUNTS).await;
    let txn = sys.begin().await;
    sys.exec(
        0,
        &txn,
        "UPDATE acct SET bal = bal - 30 WHERE id = 1",
        vec![],
    )
    .await
    .unwrap();
    sys.exec(
        1,
        &txn,
        "UPDATE acct SET bal = bal + 30 WHERE id = 2",
        vec![],
    )
    .await
    .unwrap();

    let resp = sys.commit(&txn).await;
    let t = sys.get(&txn).await;

    assert_eq!(outcome(resp.outcome), Outcome::Committed);
    assert_eq!(t.begun_by, "client", "the token's name");
    assert_eq!(t.branches.len(), 2);
    for b in &t.branches {
        assert!(b.endpoint.starts_with("https://"), "{}", b.endpoint);
    }
    assert_eq!(sys.scalar(0, "SELECT bal FROM acct WHERE id = 1").await, 70);
    assert_eq!(
        sys.scalar(1, "SELECT bal FROM acct WHERE id = 2").await,
        130
    );
    sys.assert_nothing_prepared().await;
}

/// Begin through a client with these settings, or why it failed.
async fn begin_as(tls: &Tls, bearer: &Bearer, url: &str) -> Result<String, String> {
    let channel = tls
        .endpoint(url)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    CoordinatorClient::with_interceptor(channel, bearer.clone())
        .begin(proto::BeginRequest::default())
        .await
        .map(|r| r.into_inner().txn_id)
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_a_certificate_from_the_ca_get_in() {
    let sys = System::start_secure(1).await;
    let pki = sys.pki.as_ref().unwrap();
    let token = &sys.client_bearer;
    let https = sys.url(sys.coordinator.addr);
    let http = https.replace("https://", "http://");
    let ca = std::fs::read_to_string(pki.ca_path()).unwrap();
    let stranger_pki = TestPki::new().unwrap();

    let plaintext = begin_as(&Tls::default(), token, &http).await;
    let no_certificate = begin_as(&Tls::from_pem(None, Some(&ca)), token, &https).await;
    let stranger = stranger_pki.tls("stranger").unwrap();
    let foreign_certificate = begin_as(&stranger, token, &https).await;
    let ours = begin_as(&pki.tls("orders-service").unwrap(), token, &https).await;
    let peer = Bearer::new(Some(&sys.tokens.as_ref().unwrap().peer));
    let plaintext_endpoint =
        CoordinatorClient::with_interceptor(sys.dial(sys.coordinator.addr).await, peer)
            .register_branch(proto::RegisterBranchRequest {
                txn_id: ours.clone().unwrap(),
                participant_id: "p9".into(),
                endpoint: "http://127.0.0.1:9".into(),
                instance_id: "i".into(),
                one_phase: false,
                ..Default::default()
            })
            .await
            .unwrap_err();

    assert!(plaintext.is_err(), "{plaintext:?}");
    assert!(no_certificate.is_err(), "{no_certificate:?}");
    assert!(foreign_certificate.is_err(), "{foreign_certificate:?}");
    assert!(ours.is_ok(), "{ours:?}");
    assert_eq!(plaintext_endpoint.code(), tonic::Code::FailedPrecondition);
    assert!(
        plaintext_endpoint.message().contains("https"),
        "{}",
        plaintext_endpoint.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_tool_speaks_tls_with_its_own_certificate_and_token() {
    let sys = System::start_secure(1).await;
    let txn = sys.begin().await;
    let tokens = sys.tokens.as_ref().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("operator-token");
    std::fs::write(&token_file, &tokens.operator).unwrap();
    let mut args = vec![
        "--coordinator".to_string(),
        sys.url(sys.coordinator.addr),
        "--json".into(),
        "--token-file".into(),
        token_file.display().to_string(),
    ];
    args.extend(sys.pki.as_ref().unwrap().args("operator").unwrap());
    args.extend(["show".to_string(), txn.clone()]);
    let plain_args = [
        "--coordinator",
        &sys.url(sys.coordinator.addr),
        "show",
        &txn,
    ];

    let (ok, out, err) = twopcctl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let (plain_ok, _, plain_err) = twopcctl(&plain_args).await;

    assert!(ok, "{err}");
    assert!(out.contains(&txn), "{out}");
    assert!(!plain_ok);
    assert!(
        plain_err.contains("--tls-ca"),
        "says what is missing: {plain_err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_reaches_only_what_its_role_may_call() {
    let sys = System::start_secure(1).await;
    let tokens = sys.tokens.as_ref().unwrap();
    let to_coordinator = sys.dial(sys.coordinator.addr).await;
    let to_participant = sys.dial(sys.participants[0].addr).await;
    let coordinator = |secret: Option<&str>| {
        CoordinatorClient::with_interceptor(to_coordinator.clone(), Bearer::new(secret))
    };
    let participant = |secret: Option<&str>| {
        ParticipantClient::with_interceptor(to_participant.clone(), Bearer::new(secret))
    };
    let txn = sys.begin().await;
    sys.exec(0, &txn, "SELECT 1", vec![]).await.unwrap();
    let branch = || proto::BranchRequest {
        txn_id: txn.clone(),
        ..Default::default()
    };
    let list = proto::ListTransactionsRequest::default;

    let anonymous = coordinator(None)
        .begin(proto::BeginRequest::default())
        .await
        .unwrap_err();
    let client_rolls_back = participant(Some(&tokens.client))
        .rollback(branch())
        .await
        .unwrap_err();
    let client_lists = coordinator(Some(&tokens.client))
        .list_transactions(list())
        .await
        .unwrap_err();
    let peer_begins = coordinator(Some(&tokens.peer))
        .begin(proto::BeginRequest::default())
        .await
        .unwrap_err();
    let operator_lists = coordinator(Some(&tokens.operator))
        .list_transactions(list())
        .await;
    let health = tonic_health::pb::health_client::HealthClient::new(to_coordinator.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    let commit = sys.commit(&txn).await;

    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    assert!(
        anonymous.message().contains("Bearer"),
        "{}",
        anonymous.message()
    );
    assert_eq!(client_rolls_back.code(), Code::PermissionDenied);
    assert_eq!(client_lists.code(), Code::PermissionDenied);
    assert_eq!(peer_begins.code(), Code::PermissionDenied);
    assert!(operator_lists.is_ok(), "{operator_lists:?}");
    assert!(health.is_ok(), "health needs no token: {health:?}");
    assert_eq!(
        outcome(commit.outcome),
        Outcome::Committed,
        "the refused Rollback never reached the branch"
    );
    sys.assert_nothing_prepared().await;
}

/// `--postgres … sslmode=verify-full sslrootcert=…`: the participant's sessions are encrypted,
/// and a server whose certificate the CA did not sign is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_reaches_postgres_over_verified_tls() {
    let pki = TestPki::new().unwrap();
    let stranger = TestPki::new().unwrap();
    let pg = support::pg_with("CREATE TABLE t (x int)").await;
    let (cert, key) = pki.issue("postgres").unwrap();
    pg.enable_tls(&cert, &key).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coordinator = support::start_coordinator(dir.path(), support::test_limits()).await;
    let verified = |ca: &std::path::Path| {
        format!(
            "{} sslmode=verify-full sslrootcert={}",
            pg.conn_str(),
            ca.display()
        )
    };
    let participant =
        support::start_participant("p1", coordinator.addr, &verified(&pki.ca_path()), None).await;
    let mut p = ParticipantClient::connect(support::url(participant.addr))
        .await
        .unwrap();
    let mut c = CoordinatorClient::connect(support::url(coordinator.addr))
        .await
        .unwrap();
    let txn = c
        .begin(proto::BeginRequest::default())
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    let execute = |sql: &str| proto::ExecuteRequest {
        txn_id: txn.clone(),
        sql: sql.into(),
        params: vec![],
        ..Default::default()
    };

    let ssl = p
        .execute(execute(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ))
        .await
        .unwrap()
        .into_inner();
    p.execute(execute("INSERT INTO t VALUES (1)"))
        .await
        .unwrap();
    let commit = c
        .commit(proto::CommitRequest {
            txn_id: txn.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (listener, _) = support::listener().await;
    let config = twopc::participant::Config {
        max_connections: 2,
        ..twopc::participant::Config::new(
            "p2",
            support::url(coordinator.addr),
            verified(&stranger.ca_path()),
        )
    };
    let refused = twopc::participant::run(listener, config, std::future::pending())
        .await
        .unwrap_err()
        .to_string();

    assert_eq!(
        ssl.rows[0].values[0].kind,
        Some(proto::value::Kind::BoolValue(true))
    );
    assert_eq!(outcome(commit.outcome), Outcome::Committed);
    assert_eq!(support::scalar(&pg, "SELECT count(*) FROM t").await, 1);
    assert!(refused.contains("certificate"), "{refused}");
}
