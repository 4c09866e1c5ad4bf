//! Mutual TLS on every connection: the client's, the participants' to their coordinator, the
//! coordinator's to its participants, and the operator's tool.

mod support;

use support::{System, TestPki, outcome, twopcctl};
use twopc::process::tls::Tls;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::{self, Outcome};

const ACCOUNTS: &str = "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
                        INSERT INTO acct VALUES (1, 100), (2, 100);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_commits_with_mutual_tls_on_every_connection() {
    let sys = System::start_tls(2).await;
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
async fn begin_as(tls: &Tls, url: &str) -> Result<String, String> {
    let channel = tls
        .endpoint(url)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    CoordinatorClient::new(channel)
        .begin(proto::BeginRequest::default())
        .await
        .map(|r| r.into_inner().txn_id)
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_a_certificate_from_the_ca_get_in() {
    let sys = System::start_tls(1).await;
    let pki = sys.pki.as_ref().unwrap();
    let https = sys.url(sys.coordinator.addr);
    let http = https.replace("https://", "http://");
    let ca = std::fs::read_to_string(pki.ca_path()).unwrap();
    let stranger_pki = TestPki::new().unwrap();

    let plaintext = begin_as(&Tls::default(), &http).await;
    let no_certificate = begin_as(&Tls::from_pem(None, Some(&ca)), &https).await;
    let foreign_certificate = begin_as(&stranger_pki.tls("stranger").unwrap(), &https).await;
    let ours = begin_as(&pki.tls("orders-service").unwrap(), &https).await;
    let plaintext_endpoint = sys
        .coordinator()
        .await
        .register_branch(proto::RegisterBranchRequest {
            txn_id: ours.clone().unwrap(),
            participant_id: "p9".into(),
            endpoint: "http://127.0.0.1:9".into(),
            instance_id: "i".into(),
            one_phase: false,
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
async fn the_operator_tool_speaks_tls_with_its_own_certificate() {
    let sys = System::start_tls(1).await;
    let txn = sys.begin().await;
    let mut args = vec![
        "--coordinator".to_string(),
        sys.url(sys.coordinator.addr),
        "--json".into(),
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
