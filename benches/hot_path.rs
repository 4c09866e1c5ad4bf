//! The coordinator's hot path, without a network: what `loadgen`'s coordinator-only figure
//! would be if gRPC cost nothing.
//!
//! - `decision_log`: one record written and made durable on sled (an fsync), alone and with 32
//!   at once sharing flushes (group commit).
//! - `in_process_commit`: Begin, RegisterBranch for each branch and Commit through the
//!   coordinator's core, with in-memory participants that vote yes at once and the decision
//!   flushed to sled on disk, as in the binary; one at a time, and 32 at once.
//!
//! Run with `cargo bench --bench hot_path`; CI builds it (`cargo bench --no-run`) so it cannot rot.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;
use twopc::coordinator::log::{Log, SledLog};
use twopc::coordinator::participants::fake::FakeParticipants;
use twopc::coordinator::txn::Txn;
use twopc::coordinator::{Coordinator, Limits};
use twopc::proto::TxnId;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn decision_log(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let (log, _) = SledLog::open(dir.path(), Some("bench")).expect("open the log");
    let log = Arc::new(log);
    let record = || Txn::begin(TxnId::generate(), String::new(), 0, i64::MAX);

    let mut group = c.benchmark_group("decision_log");
    group.throughput(Throughput::Elements(1));
    group.bench_function("append_and_flush", |b| {
        b.iter(|| {
            rt.block_on(async {
                log.put(&record()).unwrap();
                log.sync().await.unwrap();
            })
        })
    });
    group.throughput(Throughput::Elements(32));
    group.bench_function("append_and_flush_32_at_once", |b| {
        b.iter(|| {
            rt.block_on(async {
                let writers = (0..32).map(|_| {
                    let log = Arc::clone(&log);
                    tokio::spawn(async move {
                        log.put(&record()).unwrap();
                        log.sync().await.unwrap();
                    })
                });
                futures::future::join_all(writers).await
            })
        })
    });
    group.finish();
}

fn in_process_commit(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let (log, id) = SledLog::open(dir.path(), Some("bench")).expect("open the log");
    let core =
        Coordinator::with_participants(id, log, FakeParticipants::default(), Limits::default())
            .expect("a coordinator");
    let endpoints = ["http://p1", "http://p2"];

    let one = move |core: Arc<Coordinator<SledLog, FakeParticipants>>,
                    branches: usize,
                    one_phase: bool| async move {
        let (txn, _) = core.begin(0, String::new()).unwrap();
        for ep in &endpoints[..branches] {
            let participant = ep.trim_start_matches("http://");
            core.register_branch(txn, participant, ep, "i", one_phase)
                .await
                .unwrap();
        }
        let r = core
            .commit(txn, Limits::default().commit_wait)
            .await
            .unwrap();
        assert_eq!(r.outcome, twopc::coordinator::txn::Outcome::Committed);
    };

    let mut group = c.benchmark_group("in_process_commit");
    // A lone branch whose participant can commit in one phase skips Prepare.
    for (name, branches, one_phase) in [
        ("1_branch", 1, false),
        ("1_branch_one_phase", 1, true),
        ("2_branch", 2, false),
    ] {
        group.throughput(Throughput::Elements(1));
        group.bench_function(name, |b| {
            b.iter(|| rt.block_on(one(Arc::clone(&core), branches, one_phase)))
        });
        group.throughput(Throughput::Elements(32));
        group.bench_function(format!("{name}_32_at_once"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let commits =
                        (0..32).map(|_| tokio::spawn(one(Arc::clone(&core), branches, one_phase)));
                    futures::future::join_all(commits).await
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(5));
    targets = decision_log, in_process_commit
}
criterion_main!(benches);
