//! Who may call what: bearer tokens with roles, checked in front of every twopc service.
//!
//! A server started with `--auth-tokens FILE` admits a call only with `authorization: Bearer
//! <secret>` of a token in that file (UNAUTHENTICATED otherwise), and only to the methods its
//! role may call (PERMISSION_DENIED otherwise). The table of roles is [`roles_for`], the one
//! place the rule lives. Health and reflection stay open, so probes and `grpcurl list` work
//! without a secret.
//!
//! The file (TOML) holds each secret or only its SHA-256, so the file itself need not be a
//! secret:
//!
//! ```toml
//! [[token]]
//! name = "orders-service"   # in logs, audit lines and GetTransaction
//! role = "client"           # client | peer | operator
//! sha256 = "9f86d08…"       # or secret = "…"
//! ```
//!
//! The servers call each other as `peer`, each sending the secret in its `--peer-token-file`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tonic::codegen::http;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A service running transactions: Begin, Execute, Commit, Abort, GetTransaction,
    /// QueryOutcome; and sagas: SubmitSaga, GetSaga.
    Client,
    /// A twopc server calling another: RegisterBranch, QueryOutcome, and a branch's Prepare,
    /// Commit, Rollback, CommitOnePhase and Recover, and a saga's steps (RunSagaStep). Only a peer opens Phases or Enlist (those
    /// calls over one stream): an operator's Commit and Rollback are audited one by one.
    Peer,
    /// A person operating the system: everything, including ListTransactions,
    /// ResolveTransaction and deciding a prepared branch by hand.
    Operator,
}

/// Who made a call, as the gate found it: in the request's extensions for the handlers (audit
/// lines, GetTransaction).
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The roles that may call the gRPC method at `path` (`/twopc.v1.Coordinator/Begin`); `None`:
/// open to anyone (health, reflection).
pub fn roles_for(path: &str) -> Option<&'static [Role]> {
    use Role::*;
    const CLIENT: &[Role] = &[Client, Operator];
    const PEER: &[Role] = &[Peer, Operator];
    const ANY: &[Role] = &[Client, Peer, Operator];
    const OPERATOR: &[Role] = &[Operator];
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        return None;
    }
    Some(match path {
        "/twopc.v1.Coordinator/Begin"
        | "/twopc.v1.Coordinator/Commit"
        | "/twopc.v1.Coordinator/Abort"
        | "/twopc.v1.Coordinator/GetTransaction"
        | "/twopc.v1.Coordinator/SubmitSaga"
        | "/twopc.v1.Coordinator/GetSaga"
        | "/twopc.v1.Participant/Execute" => CLIENT,
        "/twopc.v1.Coordinator/QueryOutcome" => ANY,
        "/twopc.v1.Coordinator/RegisterBranch"
        | "/twopc.v1.Participant/Prepare"
        | "/twopc.v1.Participant/Commit"
        | "/twopc.v1.Participant/Rollback"
        | "/twopc.v1.Participant/CommitOnePhase"
        | "/twopc.v1.Participant/Recover"
        | "/twopc.v1.Participant/Waits"
        | "/twopc.v1.Participant/RunSagaStep" => PEER,
        "/twopc.v1.Participant/Phases" | "/twopc.v1.Coordinator/Enlist" => &[Peer],
        // ListTransactions, ResolveTransaction, ListLockWaits, and whatever a later version
        // adds.
        _ => OPERATOR,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read --auth-tokens {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("--auth-tokens {path}: {error}")]
    Parse {
        path: String,
        error: toml::de::Error,
    },
    #[error("--auth-tokens {path}: token {name:?} {problem}")]
    Invalid {
        path: String,
        name: String,
        problem: &'static str,
    },
    #[error(
        "refusing to listen on {listen} without --auth-tokens: anyone who reaches it could run SQL or decide transactions. Give --auth-tokens (docs/SECURITY.md), listen on 127.0.0.1, or pass --insecure"
    )]
    Open { listen: std::net::SocketAddr },
    #[error("cannot read --peer-token-file {path}: {error}")]
    PeerToken { path: String, error: std::io::Error },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<Entry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    role: Role,
    secret: Option<String>,
    sha256: Option<String>,
}

/// The tokens a server admits, by the SHA-256 of their secret: a lookup compares digests, never
/// the secrets themselves.
#[derive(Debug, Default)]
pub struct Tokens {
    by_digest: HashMap<String, Caller>,
}

/// The shortest secret accepted: 16 bytes of a random generator's output, hex or base64.
const MIN_SECRET: usize = 16;

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, AuthError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| AuthError::Read {
            path: shown.clone(),
            error,
        })?;
        Self::parse(&text, &shown)
    }

    fn parse(text: &str, path: &str) -> Result<Tokens, AuthError> {
        let file: File = toml::from_str(text).map_err(|error| AuthError::Parse {
            path: path.into(),
            error,
        })?;
        let mut by_digest = HashMap::new();
        for e in file.token {
            let invalid = |problem| AuthError::Invalid {
                path: path.into(),
                name: e.name.clone(),
                problem,
            };
            if e.name.is_empty() || e.name.len() > 64 {
                return Err(invalid("needs a name of 1 to 64 characters"));
            }
            let digest = match (&e.secret, &e.sha256) {
                (Some(secret), None) if secret.len() >= MIN_SECRET => sha256_hex(secret),
                (Some(_), None) => return Err(invalid("has a secret shorter than 16 characters")),
                (None, Some(hex))
                    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    hex.to_ascii_lowercase()
                }
                (None, Some(_)) => return Err(invalid("has a sha256 that is not 64 hex digits")),
                _ => return Err(invalid("needs exactly one of secret and sha256")),
            };
            let caller = Caller {
                name: e.name.clone(),
                role: e.role,
            };
            if by_digest.insert(digest, caller).is_some() {
                return Err(invalid("has the same secret as another token"));
            }
        }
        Ok(Tokens { by_digest })
    }

    /// The token an `authorization` header value names, if it is one of ours.
    fn find(&self, header: Option<&str>) -> Option<&Caller> {
        // The scheme is case-insensitive (RFC 9110); the secret is not.
        let (scheme, secret) = header?.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.by_digest.get(&sha256_hex(secret.trim()))
    }

    /// Admits or refuses a call to `path` with this `authorization` header.
    pub fn admit(&self, path: &str, header: Option<&str>) -> Result<Option<Caller>, tonic::Status> {
        let Some(roles) = roles_for(path) else {
            return Ok(None);
        };
        let Some(caller) = self.find(header) else {
            return Err(tonic::Status::unauthenticated(match header {
                None => "this server requires a token: send `authorization: Bearer <secret>`",
                Some(_) => "the bearer token is not one this server knows",
            }));
        };
        if !roles.contains(&caller.role) {
            return Err(tonic::Status::permission_denied(format!(
                "token {:?} has role {:?}, and {path} needs one of {roles:?}",
                caller.name, caller.role
            )));
        }
        Ok(Some(caller.clone()))
    }
}

pub fn sha256_hex(secret: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The check in front of a server's services (a tower-http request validator): `None` tokens
/// admits everyone, as a server without `--auth-tokens` does.
#[derive(Clone, Default)]
pub struct Gate(pub Option<Arc<Tokens>>);

impl<B> tower_http::validate_request::ValidateRequest<B> for Gate {
    type ResponseBody = tonic::body::Body;

    fn validate(
        &mut self,
        request: &mut http::Request<B>,
    ) -> Result<(), http::Response<Self::ResponseBody>> {
        let Some(tokens) = &self.0 else {
            return Ok(());
        };
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match tokens.admit(request.uri().path(), header) {
            Ok(Some(caller)) => {
                request.extensions_mut().insert(caller);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(status) => Err(status.into_http()),
        }
    }
}

/// The auth flags of a server binary.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "auth")]
#[command(next_help_heading = "Authentication")]
pub struct Options {
    /// TOML file of the bearer tokens this server admits, each with a name and a role
    /// (client, peer, operator); without it every caller is admitted.
    #[arg(long, env = "TWOPC_AUTH_TOKENS")]
    pub auth_tokens: Option<std::path::PathBuf>,
    /// File holding the secret this process sends when it calls its peers (a peer token in
    /// their --auth-tokens).
    #[arg(long, env = "TWOPC_PEER_TOKEN_FILE")]
    pub peer_token_file: Option<std::path::PathBuf>,
    /// Listen on a non-loopback address without --auth-tokens (refused otherwise: anyone who
    /// reaches the port could run SQL or decide transactions).
    #[arg(long, env = "TWOPC_INSECURE")]
    pub insecure: bool,
}

/// A server's auth settings, loaded: the tokens it admits and the secret it sends its peers.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    pub tokens: Option<Arc<Tokens>>,
    pub peer_token: Option<String>,
}

impl Auth {
    /// Loads the files, and refuses a non-loopback `listen` without tokens unless `insecure`.
    pub fn load(options: &Options, listen: std::net::SocketAddr) -> Result<Auth, AuthError> {
        let tokens = match &options.auth_tokens {
            Some(path) => Some(Arc::new(Tokens::load(path)?)),
            None => None,
        };
        if tokens.is_none() && !listen.ip().is_loopback() && !options.insecure {
            return Err(AuthError::Open { listen });
        }
        let peer_token = match &options.peer_token_file {
            Some(path) => Some(read_peer_token(path)?),
            None => None,
        };
        Ok(Auth { tokens, peer_token })
    }

    /// The gate in front of this server's services.
    pub fn gate(&self) -> Gate {
        Gate(self.tokens.clone())
    }

    /// What this process adds to its calls to peers.
    pub fn bearer(&self) -> Bearer {
        Bearer::new(self.peer_token.as_deref())
    }
}

/// The secret a process sends to its peers, from `--peer-token-file` (surrounding whitespace
/// trimmed).
pub fn read_peer_token(path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|error| AuthError::PeerToken {
            path: path.display().to_string(),
            error,
        })
}

/// Adds `authorization: Bearer <secret>` to every call a client makes; with `None`, nothing.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(secret: Option<&str>) -> Bearer {
        Bearer(secret.and_then(|s| format!("Bearer {s}").parse().ok()))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any token file loads or fails with a message, and any header is admitted or
        /// refused: never a panic.
        #[test]
        fn any_file_and_header_are_handled(file in "(?s).{0,300}", header in "(?s).{0,80}") {
            if let Ok(tokens) = Tokens::parse(&file, "t.toml") {
                let _ = tokens.admit("/twopc.v1.Coordinator/Begin", Some(&header));
            }
            let _ = tokens().admit("/twopc.v1.Coordinator/Begin", Some(&header));
        }
    }

    const FILE: &str = r#"
        [[token]]
        name = "orders-service"
        role = "client"
        secret = "client-secret-0123456789"

        [[token]]
        name = "p1"
        role = "peer"
        sha256 = "SHA"

        [[token]]
        name = "alice"
        role = "operator"
        secret = "operator-secret-0123456789"
    "#;

    fn tokens() -> Tokens {
        let file = FILE.replace("SHA", &sha256_hex("peer-secret-0123456789"));
        Tokens::parse(&file, "tokens.toml").unwrap()
    }

    fn code(r: Result<Option<Caller>, tonic::Status>) -> tonic::Code {
        r.map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code())
    }

    #[test]
    fn each_role_reaches_its_methods_and_no_others() {
        let t = tokens();
        let client = Some("Bearer client-secret-0123456789");
        let peer = Some("Bearer peer-secret-0123456789");
        let operator = Some("Bearer operator-secret-0123456789");

        assert_eq!(
            code(t.admit("/twopc.v1.Coordinator/Begin", client)),
            tonic::Code::Ok
        );
        assert_eq!(
            code(t.admit("/twopc.v1.Participant/Execute", client)),
            tonic::Code::Ok
        );
        assert_eq!(
            code(t.admit("/twopc.v1.Participant/Rollback", client)),
            tonic::Code::PermissionDenied,
            "a client cannot roll a branch back behind its coordinator"
        );
        assert_eq!(
            code(t.admit("/twopc.v1.Coordinator/ListTransactions", client)),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            code(t.admit("/twopc.v1.Participant/Prepare", peer)),
            tonic::Code::Ok
        );
        assert_eq!(
            code(t.admit("/twopc.v1.Coordinator/Begin", peer)),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            code(t.admit("/twopc.v1.Coordinator/ResolveTransaction", operator)),
            tonic::Code::Ok
        );
        assert_eq!(
            code(t.admit("/twopc.v1.Participant/Rollback", operator)),
            tonic::Code::Ok
        );
    }

    #[test]
    fn no_token_or_an_unknown_one_is_unauthenticated_except_for_health_and_reflection() {
        let t = tokens();

        assert_eq!(
            code(t.admit("/twopc.v1.Coordinator/Begin", None)),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(t.admit("/twopc.v1.Coordinator/Begin", Some("Bearer guess"))),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(t.admit(
                "/twopc.v1.Coordinator/Begin",
                Some("client-secret-0123456789")
            )),
            tonic::Code::Unauthenticated,
            "the secret alone, without the Bearer scheme"
        );
        assert_eq!(
            code(t.admit(
                "/twopc.v1.Coordinator/Begin",
                Some("bearer client-secret-0123456789")
            )),
            tonic::Code::Ok,
            "the scheme in any case"
        );
        assert_eq!(
            code(t.admit("/grpc.health.v1.Health/Check", None)),
            tonic::Code::Ok
        );
        assert_eq!(
            code(t.admit(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                None
            )),
            tonic::Code::Ok
        );
    }

    #[test]
    fn a_server_open_to_the_network_needs_tokens_or_insecure() {
        let everywhere: std::net::SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let loopback: std::net::SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let insecure = Options {
            insecure: true,
            ..Default::default()
        };

        let refused = Auth::load(&Options::default(), everywhere)
            .unwrap_err()
            .to_string();

        assert!(
            refused.contains("--auth-tokens") && refused.contains("--insecure"),
            "{refused}"
        );
        assert!(Auth::load(&Options::default(), loopback).is_ok());
        assert!(Auth::load(&insecure, everywhere).is_ok());
    }

    #[test]
    fn a_bad_file_names_the_token_and_the_problem() {
        let short = "[[token]]\nname = \"x\"\nrole = \"client\"\nsecret = \"short\"";
        let both = "[[token]]\nname = \"y\"\nrole = \"peer\"";
        let role = "[[token]]\nname = \"z\"\nrole = \"admin\"\nsecret = \"0123456789abcdef\"";

        let err = |text| Tokens::parse(text, "t.toml").unwrap_err().to_string();

        assert!(
            err(short).contains("\"x\" has a secret shorter"),
            "{}",
            err(short)
        );
        assert!(
            err(both).contains("exactly one of secret and sha256"),
            "{}",
            err(both)
        );
        assert!(err(role).contains("admin"), "{}", err(role));
    }
}
