//! `participant`: fronts one PostgreSQL database for the twopc coordinator.

use clap::Parser;
use std::net::SocketAddr;
use twopc::participant::{Config, run};
use twopc::process::{auth, telemetry, tls};

/// A twopc participant: runs clients' SQL inside transaction branches on one PostgreSQL
/// database, and prepares / commits / rolls them back for the coordinator.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "TWOPC_LISTEN", default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// This participant's id (A-Z a-z 0-9 _ - .), unique among the coordinator's participants.
    #[arg(long, env = "TWOPC_PARTICIPANT_ID", default_value = "p1")]
    id: String,
    /// The coordinator's URL; a replicated coordinator's URLs, separated by commas.
    #[arg(
        long,
        env = "TWOPC_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// The URL the coordinator reaches this participant at [default: http://<listen>].
    #[arg(long, env = "TWOPC_ADVERTISE")]
    advertise: Option<String>,
    /// The PostgreSQL database: a libpq key=value string or a postgres:// URL. The server needs
    /// max_prepared_transactions > 0, and the role must not be a superuser (see
    /// --allow-superuser).
    #[arg(
        long,
        env = "TWOPC_POSTGRES",
        default_value = "host=127.0.0.1 port=5432 user=twopc_participant dbname=postgres"
    )]
    postgres: String,
    /// The most PostgreSQL connections open branches hold: the most branches open at once. The
    /// protocol keeps 4 more of its own, and the health check 1.
    #[arg(long, env = "TWOPC_MAX_CONNECTIONS", default_value_t = twopc::participant::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// How often prepared branches are checked with the coordinator, in ms (also at start).
    #[arg(long, env = "TWOPC_RESOLVE_INTERVAL_MS", default_value_t = twopc::participant::DEFAULT_RESOLVE_INTERVAL.as_millis() as u64)]
    resolve_interval_ms: u64,
    /// Offer one-phase commit for a transaction whose only branch is here. Needs the markers
    /// that --print-setup-sql sets up, out of this role's reach; without them, it is off.
    #[arg(long, env = "TWOPC_ONE_PHASE", default_value_t = true, action = clap::ArgAction::Set)]
    one_phase: bool,
    /// Print the SQL that a superuser runs once in the --postgres database for one-phase
    /// commit (its markers, owned by a role of their own, for the --postgres role), and exit.
    #[arg(long)]
    print_setup_sql: bool,
    #[command(flatten)]
    limits: twopc::participant::sql::Limits,
    /// Serve even when the --postgres role is a superuser. Refused otherwise: every client
    /// that reaches the participant runs its statements as that role.
    #[arg(long, env = "TWOPC_ALLOW_SUPERUSER")]
    allow_superuser: bool,
    #[command(flatten)]
    process: telemetry::Options,
    #[command(flatten)]
    tls: tls::Options,
    #[command(flatten)]
    auth: auth::Options,
}

/// mimalloc instead of the system allocator: a server spends about 15% of its CPU in `malloc`
/// and `free` (small buffers per gRPC message, from many threads), and with mimalloc the
/// coordinator alone commits up to a third more two-branch transactions a second here
/// (docs/BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let (args, runtime) = twopc::process::start::<Args>(|a| &a.process)?;
    if args.print_setup_sql {
        let (without_tls, _) = twopc::participant::pg_tls::from_conn_str(&args.postgres)?;
        let conn: tokio_postgres::Config = without_tls
            .parse()
            .map_err(|e| anyhow::anyhow!("cannot parse --postgres: {e}"))?;
        let role = conn.get_user().ok_or_else(|| {
            anyhow::anyhow!("--postgres names no user: the setup grants to the participant's role")
        })?;
        print!("{}", twopc::participant::marker::setup_sql(role));
        return Ok(());
    }
    runtime.block_on(async {
        telemetry::serve_metrics(args.process.metrics_listen)?;
        let listener = twopc::process::bind(args.listen).await?;
        let config = Config {
            id: args.id,
            coordinator: args.coordinator,
            advertise: args.advertise,
            postgres: args.postgres,
            max_connections: args.max_connections,
            resolve_interval: std::time::Duration::from_millis(args.resolve_interval_ms),
            one_phase: args.one_phase,
            allow_superuser: args.allow_superuser,
            limits: args.limits,
            tls: tls::Tls::load(&args.tls)?,
            auth: auth::Auth::load(&args.auth, args.listen)?,
        };
        run(listener, config, twopc::process::signal::shutdown()).await
    })
}

#[cfg(test)]
mod tests {
    /// Clap checks its flag definitions only when it parses: a clash would panic at start.
    #[test]
    fn the_flags_are_well_formed() {
        <super::Args as clap::CommandFactory>::command().debug_assert();
    }
}
