//! TLS between the participant and PostgreSQL, with rustls: `sslmode=require` and
//! `sslmode=verify-full` in `--postgres`, as libpq reads them.
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require`, and leaves the checking
//! of the server's certificate to its TLS connector. So the participant takes `sslmode` and
//! `sslrootcert` out of the connection string before tokio-postgres parses it, and builds the
//! connector libpq would: `require` encrypts without checking who answers (libpq's meaning,
//! and no defence against a man in the middle); `verify-full` checks the certificate against
//! `sslrootcert` and the host name against it.

use super::error::Error;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How the participant's connections to PostgreSQL are encrypted.
#[derive(Clone)]
pub enum PgTls {
    /// Plaintext (`sslmode` absent, `disable` or `prefer`).
    Off,
    /// TLS required, with this connector.
    On(MakeRustlsConnect),
}

/// Takes `sslmode` and `sslrootcert` out of `conn_str` (key=value or URL form); returns the
/// rest for tokio-postgres and the TLS to use.
pub fn from_conn_str(conn_str: &str) -> Result<(String, PgTls), Error> {
    let (rest, mode) = take(conn_str, "sslmode");
    let (rest, root) = take(&rest, "sslrootcert");
    let tls = match mode.as_deref() {
        None | Some("disable" | "prefer") => {
            let rest = match mode.as_deref() {
                Some(m) => put_back(&rest, "sslmode", m),
                None => rest,
            };
            return Ok((rest, PgTls::Off));
        }
        Some("require") => rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth(),
        Some("verify-full") => {
            let Some(root) = root else {
                return Err(Error::InvalidArgument(
                    "sslmode=verify-full needs sslrootcert=<PEM file of the CA that signed the PostgreSQL server's certificate>".into(),
                ));
            };
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(&root).map_err(|e| {
                Error::InvalidArgument(format!("cannot read sslrootcert {root}: {e}"))
            })?;
            for cert in certs {
                let cert = cert.map_err(|e| {
                    Error::InvalidArgument(format!("sslrootcert {root} is not PEM: {e}"))
                })?;
                roots
                    .add(cert)
                    .map_err(|e| Error::InvalidArgument(format!("sslrootcert {root}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "sslrootcert {root} holds no certificate"
                )));
            }
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "sslmode={other} is not supported: use disable, prefer, require or verify-full"
            )));
        }
    };
    Ok((
        put_back(&rest, "sslmode", "require"),
        PgTls::On(MakeRustlsConnect::new(tls)),
    ))
}

/// `conn_str` without `key=value` (a key=value pair, or a URL query parameter), and the value.
fn take(conn_str: &str, key: &str) -> (String, Option<String>) {
    let url = conn_str.starts_with("postgres://") || conn_str.starts_with("postgresql://");
    if url {
        let Some((base, query)) = conn_str.split_once('?') else {
            return (conn_str.to_string(), None);
        };
        let mut value = None;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| match pair.split_once('=') {
                Some((k, v)) if k == key => {
                    value = Some(v.to_string());
                    false
                }
                _ => true,
            })
            .collect();
        let rest = match kept.is_empty() {
            true => base.to_string(),
            false => format!("{base}?{}", kept.join("&")),
        };
        return (rest, value);
    }
    // Rebuilt only when the key is there, so a quoted value with runs of spaces elsewhere (a
    // password) is untouched otherwise.
    let mut value = None;
    let kept: Vec<&str> = conn_str
        .split_whitespace()
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) if k == key => {
                value = Some(v.trim_matches('\'').to_string());
                false
            }
            _ => true,
        })
        .collect();
    match value {
        Some(_) => (kept.join(" "), value),
        None => (conn_str.to_string(), None),
    }
}

fn put_back(conn_str: &str, key: &str, value: &str) -> String {
    if conn_str.starts_with("postgres://") || conn_str.starts_with("postgresql://") {
        let sep = if conn_str.contains('?') { '&' } else { '?' };
        format!("{conn_str}{sep}{key}={value}")
    } else {
        format!("{conn_str} {key}={value}")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `sslmode=require`: any certificate is accepted, as libpq does; the handshake's signatures
/// are still checked, so the session is encrypted to whoever holds the presented key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_either_form() {
        let (rest, mode) = take(
            "host=db sslmode=verify-full sslrootcert=/ca.pem user=u",
            "sslmode",
        );
        assert_eq!(
            (rest.as_str(), mode.as_deref()),
            ("host=db sslrootcert=/ca.pem user=u", Some("verify-full"))
        );
        let (rest, root) = take(
            "postgres://u@db/app?sslmode=require&sslrootcert=/ca.pem",
            "sslrootcert",
        );
        assert_eq!(
            (rest.as_str(), root.as_deref()),
            ("postgres://u@db/app?sslmode=require", Some("/ca.pem"))
        );
        let (rest, _) = take("postgres://u@db/app?sslmode=require", "sslmode");
        assert_eq!(rest, "postgres://u@db/app");
    }

    #[test]
    fn verify_full_needs_a_root_and_unknown_modes_are_refused() {
        let err = |s: &str| match from_conn_str(s) {
            Err(e) => e.to_string(),
            Ok(_) => "accepted".into(),
        };

        assert!(err("host=db sslmode=verify-full").contains("sslrootcert"));
        assert!(err("host=db sslmode=verify-ca").contains("not supported"));
        assert!(matches!(from_conn_str("host=db").unwrap().1, PgTls::Off));
        assert!(matches!(
            from_conn_str("host=db sslmode=require").unwrap(),
            (rest, PgTls::On(_)) if rest == "host=db sslmode=require"
        ));
    }
}
