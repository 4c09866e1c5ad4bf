//! A replicated coordinator: replicas of one coordinator as processes of their own (the
//! `coordinator` binary), sharing one log on an etcd cluster, on ports fixed up front so the
//! participants and clients can know every replica's URL before any of them runs, and a
//! replica killed or stopped comes back where they expect it (docs/HA.md).

use anyhow::{Result, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::process::{Proc, Started, listen};
use crate::process::tls::Tls;
use crate::testkit::wait::{self, Health};
use crate::testkit::{EtcdCluster, free_port};

/// The lease the replicas hold leadership with: short, so a failover takes seconds.
pub const LEASE_MS: u64 = 2000;

pub struct Replicas {
    /// Replica `i`, started or not.
    pub procs: Vec<Proc>,
    /// How they are dialled (their TLS).
    tls: Tls,
}

/// How to make the replicas.
pub struct ReplicaSet<'a> {
    /// The `coordinator` binary.
    pub program: PathBuf,
    pub etcd: &'a EtcdCluster,
    /// How many.
    pub replicas: usize,
    /// The coordinator's id; its keys are under `/twopc/<id>/`.
    pub id: &'a str,
    /// Where each replica's (unused) data dir and log go.
    pub dir: &'a Path,
    /// Flags every replica gets after the log's (timeouts, TLS, tokens, etcd credentials).
    pub args: Vec<String>,
    /// How a replica is dialled: with TLS when `args` make it serve TLS.
    pub tls: Tls,
    /// Each replica's output in `<dir>/<name>.log`; otherwise only its stderr, to ours.
    pub logs: bool,
}

impl ReplicaSet<'_> {
    /// Reserves every replica's port; starts none.
    pub fn build(self) -> Result<Replicas> {
        let mut procs = Vec::new();
        for i in 0..self.replicas {
            let name = match i {
                0 => "coordinator".to_string(),
                _ => format!("coordinator-{i}"),
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let args: Vec<String> = listen(addr)
                .into_iter()
                .chain([
                    "--log".to_string(),
                    "etcd".into(),
                    "--etcd-endpoints".into(),
                    self.etcd.endpoints_flag(),
                    "--etcd-prefix".into(),
                    format!("/twopc/{}/", self.id),
                    "--id".into(),
                    self.id.into(),
                    "--lease-ms".into(),
                    LEASE_MS.to_string(),
                    "--data-dir".into(),
                    self.dir.join(format!("{name}-data")).display().to_string(),
                ])
                .chain(self.args.iter().cloned())
                .collect();
            let mut proc = Proc::new(&name, &self.program, addr, args)
                .ready_when(Health::Answers)
                .tls(self.tls.clone());
            if self.logs {
                proc = proc.log_to(&self.dir.join(format!("{name}.log")));
            }
            procs.push(proc);
        }
        Ok(Replicas {
            procs,
            tls: self.tls,
        })
    }
}

impl Replicas {
    /// Every replica's URL, separated by commas: what participants and clients dial.
    pub fn urls(&self) -> String {
        self.procs
            .iter()
            .map(Proc::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, i: usize) -> String {
        self.procs[i].url()
    }

    /// Starts replica `i` and waits until it answers (leading or standing by).
    pub async fn start(&mut self, i: usize, failpoints: Option<&str>) -> Result<Started> {
        self.procs[i].start(failpoints).await
    }

    /// Whether replica `i` leads now.
    pub async fn leads(&self, i: usize) -> bool {
        self.procs[i].running() && wait::serving(&self.tls, &self.url(i), Health::Leads).await
    }

    /// The replica that leads now, if one does.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.procs.len() {
            if self.leads(i).await {
                return Some(i);
            }
        }
        None
    }

    /// Waits up to `within` until some replica leads.
    pub async fn wait_for_leader(&self, within: Duration) -> Result<usize> {
        let until = Instant::now() + within;
        loop {
            if let Some(i) = self.leader().await {
                return Ok(i);
            }
            if Instant::now() > until {
                bail!("no coordinator replica leads after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
