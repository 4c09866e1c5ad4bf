//! TLS on every gRPC connection, served and dialled, with rustls (through tonic).
//!
//! One set of files per process. `--tls-cert` and `--tls-key` are its identity: presented as a
//! server, and as a client certificate when it dials a peer (the participant its coordinator,
//! the coordinator its participants). `--tls-ca` is the CA peers must chain to: with it a
//! server requires a client certificate (mutual TLS), and every server the process dials must
//! present a certificate from it. A process with TLS dials only `https://` peers, so a
//! deployment that turned TLS on never sends a Prepare or a Commit in the clear by mistake.

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The TLS flags every server binary (and `twopcctl`) takes.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "tls")]
#[command(next_help_heading = "TLS")]
pub struct Options {
    /// PEM certificate (chain) of this process, served and shown to the peers it dials;
    /// with --tls-key, the server speaks TLS and its URLs are https://.
    #[arg(long, env = "TWOPC_TLS_CERT", requires = "tls_key", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TWOPC_TLS_KEY", requires = "tls_cert", global = true)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA that clients, peers and the servers this process dials must chain to; on a
    /// server it requires a client certificate (mutual TLS).
    #[arg(long, env = "TWOPC_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
}

/// A process's TLS settings, loaded; the default is plaintext.
#[derive(Clone, Debug)]
pub struct Tls {
    identity: Option<Identity>,
    ca: Option<Certificate>,
    /// The flag that gives `ca`, for messages (`--tls-ca`, or `--etcd-ca` for etcd's).
    ca_flag: &'static str,
}

impl Default for Tls {
    fn default() -> Tls {
        Tls {
            identity: None,
            ca: None,
            ca_flag: "--tls-ca",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {flag} {path}: {error}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{flag} {path} holds no PEM block (-----BEGIN ...): give a PEM file")]
    NotPem { flag: &'static str, path: PathBuf },
    #[error(
        "{url} is https:// but this process has no {flag} to check the certificate it presents"
    )]
    NoCa { url: String, flag: &'static str },
    #[error(
        "{url} is not https://, and this process uses TLS ({flag}): its peers must serve TLS too"
    )]
    Plaintext { url: String, flag: &'static str },
    #[error("{url}: {error}")]
    Url {
        url: String,
        error: tonic::transport::Error,
    },
    #[error("no URL given")]
    NoUrl,
}

impl Tls {
    /// Reads the files the flags name.
    pub fn load(options: &Options) -> Result<Tls, TlsError> {
        Tls::load_files(
            ["--tls-cert", "--tls-key", "--tls-ca"],
            options.tls_cert.as_deref(),
            options.tls_key.as_deref(),
            options.tls_ca.as_deref(),
        )
    }

    /// Reads a certificate, its key and a CA from files that the flags `names` give (for the
    /// messages), each optional.
    pub fn load_files(
        names: [&'static str; 3],
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Tls, TlsError> {
        let [cert_flag, key_flag, ca_flag] = names;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some(Identity::from_pem(
                read_pem(cert_flag, cert)?,
                read_pem(key_flag, key)?,
            )),
            _ => None,
        };
        let ca = match ca {
            Some(ca) => Some(Certificate::from_pem(read_pem(ca_flag, ca)?)),
            None => None,
        };
        Ok(Tls {
            identity,
            ca,
            ca_flag,
        })
    }

    /// From PEM text: an identity (certificate, key) and a CA.
    pub fn from_pem(identity: Option<(&str, &str)>, ca: Option<&str>) -> Tls {
        Tls {
            identity: identity.map(|(cert, key)| Identity::from_pem(cert, key)),
            ca: ca.map(Certificate::from_pem),
            ..Tls::default()
        }
    }

    /// Whether this process serves TLS.
    pub fn serves_tls(&self) -> bool {
        self.identity.is_some()
    }

    /// The scheme of this process's own URLs.
    pub fn scheme(&self) -> &'static str {
        match self.serves_tls() {
            true => "https",
            false => "http",
        }
    }

    /// The server side: `None` serves plaintext. With a CA, client certificates are required.
    pub fn server(&self) -> Option<ServerTlsConfig> {
        let identity = self.identity.clone()?;
        let config = ServerTlsConfig::new().identity(identity);
        Some(match &self.ca {
            Some(ca) => config.client_ca_root(ca.clone()),
            None => config,
        })
    }

    /// Whether `url` may be dialled: https needs the CA, and with a CA only https is dialled.
    pub fn check_peer(&self, url: &str) -> Result<(), TlsError> {
        let https = url.starts_with("https://");
        match (https, self.ca.is_some()) {
            (true, false) => Err(TlsError::NoCa {
                url: url.into(),
                flag: self.ca_flag,
            }),
            (false, true) => Err(TlsError::Plaintext {
                url: url.into(),
                flag: self.ca_flag,
            }),
            _ => Ok(()),
        }
    }

    /// An endpoint for `url`, with the CA and this process's identity when it is https.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        self.check_peer(url)?;
        let bad = |error| TlsError::Url {
            url: url.into(),
            error,
        };
        let endpoint = Endpoint::from_shared(url.to_string()).map_err(bad)?;
        match self.client() {
            Some(config) => endpoint.tls_config(config).map_err(bad),
            None => Ok(endpoint),
        }
    }

    /// The client side: the CA to check servers against and this process's certificate to
    /// show them; `None` dials plaintext.
    pub fn client(&self) -> Option<ClientTlsConfig> {
        let config = ClientTlsConfig::new().ca_certificate(self.ca.clone()?);
        Some(match &self.identity {
            Some(identity) => config.identity(identity.clone()),
            None => config,
        })
    }
}

fn read_pem(flag: &'static str, path: &Path) -> Result<String, TlsError> {
    let text = std::fs::read_to_string(path).map_err(|error| TlsError::Read {
        flag,
        path: path.into(),
        error,
    })?;
    if !text.contains("-----BEGIN ") {
        return Err(TlsError::NotPem {
            flag,
            path: path.into(),
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_dials_only_http_and_tls_only_https() {
        let plain = Tls::default();
        let mutual = Tls::from_pem(None, Some("-----BEGIN CERTIFICATE-----"));

        assert!(plain.check_peer("http://127.0.0.1:1").is_ok());
        assert!(matches!(
            plain.check_peer("https://127.0.0.1:1"),
            Err(TlsError::NoCa { .. })
        ));
        assert!(mutual.check_peer("https://127.0.0.1:1").is_ok());
        assert!(matches!(
            mutual.check_peer("http://127.0.0.1:1"),
            Err(TlsError::Plaintext { .. })
        ));
    }

    #[test]
    fn a_file_that_is_not_pem_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.der");
        std::fs::write(&path, [0x30, 0x82, 0x01]).unwrap();
        let options = Options {
            tls_cert: Some(path.clone()),
            tls_key: Some(path),
            tls_ca: None,
        };

        let err = Tls::load(&options).unwrap_err().to_string();

        assert!(
            err.contains("--tls-cert") && err.contains("cert.der"),
            "{err}"
        );
    }
}
