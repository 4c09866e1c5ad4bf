//! Throwaway bearer tokens, one per role, in an `--auth-tokens` file, for tests, the demo and
//! the benchmarks run with authentication on.

use crate::process::auth::{self, Auth, Tokens};
use anyhow::Result;
use std::path::PathBuf;
use std::sync::Arc;

pub struct TestTokens {
    dir: tempfile::TempDir,
    /// Of the token named `client`, role client.
    pub client: String,
    /// Of the token named `operator`, role operator.
    pub operator: String,
    /// Of the token named `peer`, role peer: what every server sends the others.
    pub peer: String,
}

impl TestTokens {
    pub fn new() -> Result<TestTokens> {
        let secret = || uuid::Uuid::new_v4().simple().to_string();
        let (client, operator, peer) = (secret(), secret(), secret());
        let dir = tempfile::Builder::new().prefix("twopc-tokens-").tempdir()?;
        // The peer token by its digest, as a deployment would keep it.
        let file = format!(
            "[[token]]\nname = \"client\"\nrole = \"client\"\nsecret = \"{client}\"\n\n\
             [[token]]\nname = \"operator\"\nrole = \"operator\"\nsecret = \"{operator}\"\n\n\
             [[token]]\nname = \"peer\"\nrole = \"peer\"\nsha256 = \"{}\"\n",
            auth::sha256_hex(&peer)
        );
        std::fs::write(dir.path().join("tokens.toml"), file)?;
        std::fs::write(dir.path().join("peer-token"), format!("{peer}\n"))?;
        Ok(TestTokens {
            dir,
            client,
            operator,
            peer,
        })
    }

    pub fn tokens_path(&self) -> PathBuf {
        self.dir.path().join("tokens.toml")
    }

    pub fn peer_token_path(&self) -> PathBuf {
        self.dir.path().join("peer-token")
    }

    /// A server's settings: these tokens admitted, the peer token sent.
    pub fn auth(&self) -> Result<Auth> {
        Ok(Auth {
            tokens: Some(Arc::new(Tokens::load(&self.tokens_path())?)),
            peer_token: Some(self.peer.clone()),
        })
    }

    /// The same as a server binary's arguments.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--auth-tokens".into(),
            self.tokens_path().display().to_string(),
            "--peer-token-file".into(),
            self.peer_token_path().display().to_string(),
        ]
    }
}
