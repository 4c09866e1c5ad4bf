//! Operating the real binaries: metrics, structured logs, configuration precedence, and a
//! graceful stop.

use crate::support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::{eventually, free_addr, pg_with, start_participant, url};
use tonic::Code;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
use twopc::proto::{self, Outcome};

/// GET http://addr/metrics, with no HTTP client crate: the exposition format is plain text.
fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn coordinator_args(dir: &tempfile::TempDir, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--data-dir".to_string(), dir.path().display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_outcomes_and_time_the_phases() {
    let pg = pg_with("CREATE TABLE t (x int)").await;
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_addr();
    let metrics_flag = metrics.to_string();
    let caddr = free_addr();
    let _coordinator = support::process(
        "coordinator",
        caddr,
        &coordinator_args(&dir, &["--metrics-listen", &metrics_flag]),
        "",
    )
    .await;
    let participant = start_participant("p1", caddr, &pg.conn_str(), None).await;
    let mut c = CoordinatorClient::connect(url(caddr)).await.unwrap();
    let mut p = ParticipantClient::connect(url(participant.addr))
        .await
        .unwrap();
    for (sql, want) in [
        ("INSERT INTO t VALUES (1)", Outcome::Committed),
        ("INSERT INTO nope VALUES (1)", Outcome::Aborted),
    ] {
        let txn = c
            .begin(proto::BeginRequest::default())
            .await
            .unwrap()
            .into_inner()
            .txn_id;
        let _ = p
            .execute(proto::ExecuteRequest {
                txn_id: txn.clone(),
                sql: sql.into(),
                params: vec![],
                ..Default::default()
            })
            .await;
        let r = c
            .commit(proto::CommitRequest {
                txn_id: txn,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.outcome(), want);
    }

    let mut body = String::new();
    eventually("the gauges are published", || {
        body = scrape(metrics);
        let done = body.contains("twopc_in_doubt_transactions");
        async move { done }
    })
    .await;

    assert!(
        body.contains("twopc_transactions_total{outcome=\"committed\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("twopc_transactions_total{outcome=\"aborted\"} 1"),
        "{body}"
    );
    for series in [
        "twopc_log_flush_seconds_bucket",
        "twopc_phase_duration_seconds_bucket{phase=\"one_phase\"",
        "twopc_phase_duration_seconds_bucket{phase=\"decision_flush\"",
        "twopc_oldest_in_doubt_seconds",
        "twopc_live_transactions",
    ] {
        assert!(body.contains(series), "{series} missing from:\n{body}");
    }
}

#[test]
fn flags_beat_the_environment_which_beats_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("twopc.toml");
    std::fs::write(&file, "max-timeout-ms = 1000\ndefault_timeout_ms = 500\n").unwrap();
    let help = |env: Option<&str>, flag: Option<&str>| {
        // --help prints the effective value of each option after the file and env are applied.
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordinator"));
        cmd.arg("--config")
            .arg(&file)
            .env_remove("TWOPC_MAX_TIMEOUT_MS");
        if let Some(v) = env {
            cmd.env("TWOPC_MAX_TIMEOUT_MS", v);
        }
        if let Some(v) = flag {
            cmd.args(["--max-timeout-ms", v]);
        }
        cmd.arg("--help");
        String::from_utf8(cmd.output().unwrap().stdout).unwrap()
    };
    let line = |text: &str| {
        text.lines()
            .skip_while(|l| !l.contains("--max-timeout-ms"))
            .nth(1)
            .unwrap_or_default()
            .to_string()
    };

    let from_file = help(None, None);
    let from_env = help(Some("2000"), None);

    assert!(
        line(&from_file).contains("TWOPC_MAX_TIMEOUT_MS=1000"),
        "{from_file}"
    );
    assert!(
        line(&from_env).contains("TWOPC_MAX_TIMEOUT_MS=2000"),
        "{from_env}"
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "max-timeout-ms = \"soon\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&bad)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("invalid value 'soon'") && stderr.contains("--max-timeout-ms"),
        "{stderr}"
    );
    std::fs::write(&bad, "max-timout-ms = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("unknown option \"max-timout-ms\""),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flag_beats_the_environment_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("twopc.toml");
    std::fs::write(&file, "max-timeout-ms = 1000\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    let caddr = free_addr();
    let file_flag = file.display().to_string();
    let _c = support::process(
        "coordinator",
        caddr,
        &coordinator_args(&data, &["--config", &file_flag, "--max-timeout-ms", "3000"]),
        "",
    )
    .await;
    let mut c = CoordinatorClient::connect(url(caddr)).await.unwrap();

    let within = c
        .begin(proto::BeginRequest {
            timeout_ms: 2500,
            label: String::new(),
        })
        .await;
    let above = c
        .begin(proto::BeginRequest {
            timeout_ms: 3500,
            label: String::new(),
        })
        .await
        .unwrap_err();

    assert!(within.is_ok(), "{within:?}");
    assert_eq!(above.code(), Code::InvalidArgument);
    assert!(above.message().contains("3000 ms"), "{}", above.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let caddr = free_addr();
    let mut child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args([
            "--listen",
            &caddr.to_string(),
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 4096];
        let n = stderr.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    let line: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(line["level"], "INFO");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("coordinator serving"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_transactions_lets_in_flight_ones_finish_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let caddr = free_addr();
    let mut coordinator = support::process(
        "coordinator",
        caddr,
        &coordinator_args(&dir, &["--drain-timeout-ms", "20000"]),
        "",
    )
    .await;
    let mut c = CoordinatorClient::connect(url(caddr)).await.unwrap();
    let in_flight = c
        .begin(proto::BeginRequest::default())
        .await
        .unwrap()
        .into_inner()
        .txn_id;

    coordinator.signal("TERM").unwrap();
    let mut refused = None;
    for _ in 0..50 {
        match c.begin(proto::BeginRequest::default()).await {
            Err(s) => {
                refused = Some(s);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let finished = c
        .commit(proto::CommitRequest {
            txn_id: in_flight,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = coordinator.wait_exit(support::EXIT_WAIT).await.unwrap();

    assert_eq!(
        refused.expect("Begin refused while draining").code(),
        Code::Unavailable
    );
    assert_eq!(finished.outcome(), Outcome::Committed);
    assert!(status.success(), "exit status {status:?}");
}

/// Every client that reaches a participant runs its statements as the participant's
/// PostgreSQL role, so a superuser role is refused unless the operator insists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_refuses_a_superuser_role_unless_allowed() {
    let pg = pg_with("CREATE TABLE t (x int)").await;
    let dir = tempfile::tempdir().unwrap();
    let caddr = free_addr();
    let _coordinator =
        support::process("coordinator", caddr, &coordinator_args(&dir, &[]), "").await;
    let (listener, _) = support::listener().await;
    let as_superuser = |allow_superuser| twopc::participant::Config {
        max_connections: 2,
        allow_superuser,
        ..twopc::participant::Config::new("p1", url(caddr), pg.admin_conn_str())
    };

    let refused = twopc::participant::run(listener, as_superuser(false), std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    let paddr = free_addr();
    let args: Vec<String> = [
        "--id",
        "p1",
        "--coordinator",
        &url(caddr),
        "--postgres",
        &pg.admin_conn_str(),
        "--allow-superuser",
    ]
    .map(String::from)
    .into();
    let _allowed = support::process("participant", paddr, &args, "").await;
    let mut c = CoordinatorClient::connect(url(caddr)).await.unwrap();
    let txn = c
        .begin(proto::BeginRequest::default())
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    ParticipantClient::connect(url(paddr))
        .await
        .unwrap()
        .execute(proto::ExecuteRequest {
            txn_id: txn.clone(),
            sql: "INSERT INTO t VALUES (1)".into(),
            params: vec![],
            ..Default::default()
        })
        .await
        .unwrap();
    let commit = c
        .commit(proto::CommitRequest {
            txn_id: txn,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    assert!(refused.contains("a superuser"), "{refused}");
    assert!(
        refused.contains("CREATE ROLE") && refused.contains("--allow-superuser"),
        "says how to fix it: {refused}"
    );
    assert_eq!(support::outcome(commit.outcome), Outcome::Committed);
    assert_eq!(support::scalar(&pg, "SELECT count(*) FROM t").await, 1);
}
