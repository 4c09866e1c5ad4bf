//! A throwaway certificate authority and certificates for servers on loopback, so tests, the
//! demo and the benchmarks can run every connection over mutual TLS.
//!
//! Each certificate names `localhost` and `127.0.0.1` and may serve and dial alike (no
//! extended key usage), as every twopc process does both. The files live in a temp dir that
//! goes away with the [`TestPki`].

use crate::process::tls::{self, Tls};
use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};

pub struct TestPki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl TestPki {
    pub fn new() -> Result<TestPki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "twopc test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let dir = tempfile::Builder::new().prefix("twopc-pki-").tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).context("writing ca.pem")?;
        Ok(TestPki { dir, ca })
    }

    /// The CA certificate (PEM).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate for `name` (its common name) and writes `<name>.pem` and
    /// `<name>-key.pem`; returns their paths.
    pub fn issue(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        let (cert_path, key_path) = (self.file(name, ".pem"), self.file(name, "-key.pem"));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }

    /// The flags of a process named `name`, with a certificate of its own.
    pub fn options(&self, name: &str) -> Result<tls::Options> {
        let (cert, key) = self.issue(name)?;
        Ok(tls::Options {
            tls_cert: Some(cert),
            tls_key: Some(key),
            tls_ca: Some(self.ca_path()),
        })
    }

    /// The same flags as command-line arguments.
    pub fn args(&self, name: &str) -> Result<Vec<String>> {
        let o = self.options(name)?;
        let path = |p: Option<PathBuf>| p.unwrap_or_default().display().to_string();
        Ok(vec![
            "--tls-cert".into(),
            path(o.tls_cert),
            "--tls-key".into(),
            path(o.tls_key),
            "--tls-ca".into(),
            path(o.tls_ca),
        ])
    }

    /// Loaded settings for an in-process server or client named `name`.
    pub fn tls(&self, name: &str) -> Result<Tls> {
        Ok(Tls::load(&self.options(name)?)?)
    }

    fn file(&self, name: &str, suffix: &str) -> PathBuf {
        Path::new(self.dir.path()).join(format!("{name}{suffix}"))
    }
}
