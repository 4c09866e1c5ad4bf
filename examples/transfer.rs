//! `transfer`: moves an amount between two ledger services in one global transaction, the way
//! any client service would: `transact`, and two ordinary gRPC calls through `PropagateLayer`.
//! Neither ledger (nor the audit service they call) sees a transaction id in its API.
//!
//! ```sh
//! cargo run --example transfer -- --coordinator http://127.0.0.1:50051 \
//!     --from http://127.0.0.1:7001 --to http://127.0.0.1:7002 --account alice --amount 25
//! ```

use clap::Parser;
use tower_layer::Layer;
use twopc::client::propagation::PropagateLayer;
use twopc::client::{Client, transact};

mod pb {
    tonic::include_proto!("ledger.v1");
}

use pb::ledger_client::LedgerClient;

/// Moves money between two ledgers, atomically.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// The ledger debited.
    #[arg(long)]
    pub from: String,
    /// The ledger credited.
    #[arg(long)]
    pub to: String,
    #[arg(long)]
    pub account: String,
    #[arg(long)]
    pub amount: i64,
    #[arg(long, default_value = "transfer")]
    pub memo: String,
}

/// The error of a transfer: a ledger's answer, or the transaction's outcome.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{}: {}", .0.code(), .0.message())]
    Ledger(#[from] tonic::Status),
    #[error(transparent)]
    Twopc(#[from] twopc::client::Error),
}

/// Debits `from` and credits `to` in one global transaction; the two entry ids.
pub async fn run(args: &Args) -> Result<(i64, i64), TransferError> {
    let client = Client::connect(&args.coordinator)?;
    let ledger = |url: &str| -> Result<_, TransferError> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .connect_lazy();
        Ok(LedgerClient::new(PropagateLayer.layer(channel)))
    };
    let (from, to) = (ledger(&args.from)?, ledger(&args.to)?);
    let post = |amount: i64| pb::PostRequest {
        account: args.account.clone(),
        amount,
        memo: args.memo.clone(),
    };
    transact(&client, |_tx| {
        let (mut from, mut to) = (from.clone(), to.clone());
        let (debit, credit) = (post(-args.amount), post(args.amount));
        async move {
            let debited = from.post(debit).await?.into_inner().entry_id;
            let credited = to.post(credit).await?.into_inner().entry_id;
            Ok::<_, TransferError>((debited, credited))
        }
    })
    .await
}

#[allow(dead_code)] // the tests include this file for `run`
#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok((debited, credited)) => {
            println!(
                "committed: {} moved {} from {} (entry {debited}) to {} (entry {credited})",
                args.account, args.amount, args.from, args.to
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            println!("aborted everywhere: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
