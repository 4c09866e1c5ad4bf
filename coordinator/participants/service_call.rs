//! A saga's gRPC step: a unary call of any method of the user's service, whose request and
//! response are bytes the coordinator never decodes (the client encoded the request; the
//! response is the step's output). tonic calls a method through a codec; this one passes the
//! message bytes through as they are.

use super::ServiceCall;
use crate::proto;
use bytes::{Buf, BufMut};
use std::time::Duration;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::transport::Channel;

/// Message bytes in, message bytes out.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

/// Calls `call.method` on `channel` with the step's metadata, within `timeout`.
pub async fn call(
    channel: Channel,
    call: ServiceCall,
    timeout: Duration,
) -> Result<Vec<u8>, tonic::Status> {
    let path: tonic::codegen::http::uri::PathAndQuery = call
        .method
        .parse()
        .map_err(|e| tonic::Status::invalid_argument(format!("method {:?}: {e}", call.method)))?;
    let mut req = tonic::Request::new(call.request);
    req.set_timeout(timeout);
    let text = |v: &str| {
        MetadataValue::try_from(v)
            .map_err(|e| tonic::Status::invalid_argument(format!("metadata {v:?}: {e}")))
    };
    let md = req.metadata_mut();
    md.insert(proto::SAGA_ID_METADATA, text(&call.saga_id)?);
    md.insert(proto::SAGA_STEP_METADATA, text(&call.step)?);
    md.insert(
        proto::SAGA_OP_METADATA,
        text(if call.compensate {
            "compensate"
        } else {
            "action"
        })?,
    );
    md.insert_bin(
        proto::SAGA_BARRIER_METADATA,
        BinaryMetadataValue::from_bytes(&call.action_secret),
    );
    if let Some(secret) = &call.compensation_secret {
        md.insert_bin(
            proto::SAGA_COMPENSATION_METADATA,
            BinaryMetadataValue::from_bytes(secret),
        );
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    let answer = async {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{}: {e}", call.endpoint)))?;
        grpc.unary(req, path, RawCodec).await
    };
    match tokio::time::timeout(timeout, answer).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer from {} within {timeout:?}",
            call.endpoint
        ))),
    }
}
