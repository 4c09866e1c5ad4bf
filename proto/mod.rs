//! The wire: the code generated from `proto/twopc/v1/twopc.proto`, its descriptor set (for
//! server reflection), and what both sides of the protocol read from it: the transaction id,
//! the names coordinators and participants go by ([`names`]), a branch's [`vote`], and the
//! secret that addresses a one-phase commit's marker ([`marker`]).

#[cfg(test)]
pub mod fuzzing;
pub mod marker;
pub mod names;
mod start;
mod txn_id;
pub mod vote;

pub use start::Start;
pub use txn_id::{InvalidTxnId, TxnId};

tonic::include_proto!("twopc.v1");

/// The encoded descriptor set of every `twopc.v1` file, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/twopc_descriptor.bin"));

/// The connections a server accepts on `listener`: no Nagle delay on small frames, and TCP
/// keepalive so a peer that vanished without a FIN is dropped.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)))
}

/// Metadata on a `stale epoch` refusal: the coordinator's current epoch, so a client learns it
/// without another call (docs/PROTOCOL.md §12).
pub const EPOCH_METADATA: &str = "twopc-epoch";

/// Metadata on every failed Execute: the participant's id, which a client names at Commit as
/// it names `ExecuteResponse.participant_id` after a success.
pub const PARTICIPANT_ID_METADATA: &str = "twopc-participant-id";

/// The most calls in flight on one client connection (HTTP/2 streams).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// A client's input as an error message quotes it: at most its first 48 characters. A status
/// message travels in an HTTP/2 header, and echoing a megabyte back would fail the reply.
pub fn shown(input: &str) -> String {
    const SHOWN: usize = 48;
    match input.char_indices().nth(SHOWN) {
        None => input.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &input[..cut], input.len()),
    }
}

/// The layers in front of every twopc server's services.
pub type Gated = tower_layer::Stack<
    tower_http::validate_request::ValidateRequestHeaderLayer<crate::process::auth::Gate>,
    tower_layer::Identity,
>;

/// Why a server could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("TLS: {0}")]
    Tls(#[from] tonic::transport::Error),
}

/// A gRPC server with what every twopc server offers besides its own service: health, and
/// reflection in both versions (grpcurl 1.8 speaks only v1alpha), so `grpcurl list` and
/// `describe` work with no .proto file at hand. `tls`: `None` serves plaintext; `gate` admits
/// the calls it lets through (`process::auth`).
pub fn server_with(
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    tls: Option<tonic::transport::ServerTlsConfig>,
    gate: crate::process::auth::Gate,
) -> Result<tonic::transport::server::Router<Gated>, ServerError> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // A dead peer is noticed within 40 s, one connection cannot open unbounded streams, and
    // headers stay small; the 4 MiB message limit is tonic's default.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(64 * 1024);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    Ok(builder
        .layer(tower_http::validate_request::ValidateRequestHeaderLayer::custom(gate))
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha))
}

/// Short constructors for the values clients send most.
impl Value {
    pub fn int(v: i64) -> Value {
        Value {
            kind: Some(value::Kind::IntValue(v)),
        }
    }

    pub fn text(v: impl Into<String>) -> Value {
        Value {
            kind: Some(value::Kind::TextValue(v.into())),
        }
    }

    pub fn null() -> Value {
        Value {
            kind: Some(value::Kind::NullValue(true)),
        }
    }
}
