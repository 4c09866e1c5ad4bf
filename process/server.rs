//! What every twopc server is built on: the gRPC server with health and reflection beside its
//! own service, its HTTP/2 limits, and the TCP options of the connections it accepts.

/// The connections a server accepts on `listener`: no Nagle delay on small frames, and TCP
/// keepalive so a peer that vanished without a FIN is dropped.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)))
}

/// The most calls in flight on one client connection (HTTP/2 streams).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

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
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
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
