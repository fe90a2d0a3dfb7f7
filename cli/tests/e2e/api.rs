//! The coordinator's gRPC API as the tests call it: the generated clients with an optional
//! bearer token, and [`Api::raw_call`], which sends arbitrary bytes as a gRPC message (a
//! codec that passes bytes through), for hostile requests the generated clients cannot make.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use deepmad_proto::v1;
use deepmad_proto::v1::sweep_service_client::SweepServiceClient;
use deepmad_proto::v1::work_service_client::WorkServiceClient;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// A connection to a coordinator (lazy: it connects, and reconnects, on use).
#[derive(Clone, Debug)]
pub struct Api {
    channel: Channel,
    token: Option<String>,
}

impl Api {
    pub fn new(url: &str, token: Option<&str>) -> Api {
        let channel = Endpoint::from_shared(url.to_string())
            .expect("a valid URL")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .connect_lazy();
        Api {
            channel,
            token: token.map(str::to_string),
        }
    }

    /// Returns the same connection with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api {
            channel: self.channel.clone(),
            token: token.map(str::to_string),
        }
    }

    /// Wraps `message`, adding `authorization: Bearer <token>` when a token is set.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("ASCII token"),
            );
        }
        request
    }

    pub fn sweeps(&self) -> SweepServiceClient<Channel> {
        SweepServiceClient::new(self.channel.clone())
    }

    pub fn work(&self) -> WorkServiceClient<Channel> {
        WorkServiceClient::new(self.channel.clone())
    }

    pub async fn sweep(&self, id: &str) -> Result<v1::SweepSummary, Status> {
        let request = self.request(v1::GetSweepRequest {
            sweep_id: id.to_string(),
        });
        Ok(self.sweeps().get_sweep(request).await?.into_inner())
    }

    pub async fn list_sweeps(&self) -> Result<Vec<v1::SweepSummary>, Status> {
        let request = self.request(v1::ListSweepsRequest { limit: 100 });
        Ok(self
            .sweeps()
            .list_sweeps(request)
            .await?
            .into_inner()
            .sweeps)
    }

    /// Sends `body` as the one message of a unary call to `path`
    /// (`/deepmad.v1.SweepService/CreateSweep`) and returns the reply's raw bytes.
    pub async fn raw_call(&self, path: &str, body: Bytes) -> Result<Bytes, Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|error| Status::unavailable(format!("not ready: {error}")))?;
        let path: PathAndQuery = path.parse().expect("a valid gRPC path");
        let reply = grpc.unary(self.request(body), path, RawCodec).await?;
        Ok(reply.into_inner())
    }
}

/// A gRPC codec whose messages are bytes, sent and received as they are.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
