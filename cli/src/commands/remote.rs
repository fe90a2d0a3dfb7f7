//! Connecting to a coordinator: `--coordinator URL` (or `DEEPMAD_COORDINATOR`; `https://`
//! verified against `--ca-cert` or the system's roots) and a bearer token from `--token` (or
//! `DEEPMAD_TOKEN`) on every call.

use deepmad_proto::client::{endpoint, Bearer};
use deepmad_proto::v1::result_service_client::ResultServiceClient;
use deepmad_proto::v1::sweep_service_client::SweepServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::args::RemoteArgs;
use crate::Failure;

pub type Authed = InterceptedService<Channel, Bearer>;

/// An open connection to a coordinator.
#[derive(Debug)]
pub struct Remote {
    channel: Channel,
    bearer: Bearer,
}

impl Remote {
    /// Connects, or fails with a message naming the URL (or the CA file, or the token).
    pub async fn connect(args: &RemoteArgs) -> Result<Remote, Failure> {
        let usage = |error: deepmad_proto::client::ClientError| Failure::usage(error.to_string());
        let bearer = Bearer::new(args.token.as_deref()).map_err(usage)?;
        let endpoint = endpoint(&args.coordinator, args.ca_cert.as_deref()).map_err(usage)?;
        let channel = endpoint.connect().await.map_err(|error| Failure {
            code: 1,
            message: format!(
                "cannot reach the coordinator at {}: {error}",
                args.coordinator
            ),
        })?;
        Ok(Remote { channel, bearer })
    }

    pub fn sweeps(&self) -> SweepServiceClient<Authed> {
        SweepServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub fn results(&self) -> ResultServiceClient<Authed> {
        ResultServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
}

/// Maps a gRPC status to a CLI failure: the caller's fault exits 2, anything else 1.
pub fn status_failure(status: Status) -> Failure {
    let code = match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition => 2,
        _ => 1,
    };
    Failure {
        code,
        message: format!("{}: {}", status.code().description(), status.message()),
    }
}
