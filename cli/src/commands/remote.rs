//! Connecting to a coordinator: `--coordinator URL` (or `DEEPMAD_COORDINATOR`) and a bearer
//! token from `--token` (or `DEEPMAD_TOKEN`) on every call.

use deepmad_proto::v1::result_service_client::ResultServiceClient;
use deepmad_proto::v1::sweep_service_client::SweepServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::args::RemoteArgs;
use crate::Failure;

/// Adds `authorization: Bearer <token>` to every request when a token is configured.
#[derive(Clone, Debug)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

/// An open connection to a coordinator.
#[derive(Debug)]
pub struct Remote {
    channel: Channel,
    bearer: Bearer,
}

impl Remote {
    /// Connects, or fails with a message naming the URL.
    pub async fn connect(args: &RemoteArgs) -> Result<Remote, Failure> {
        let endpoint = Endpoint::from_shared(args.coordinator.clone())
            .map_err(|_| {
                Failure::usage(format!(
                    "--coordinator: {:?} is not a URL like http://127.0.0.1:50051",
                    args.coordinator
                ))
            })?
            .connect_timeout(std::time::Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|error| Failure {
            code: 1,
            message: format!(
                "cannot reach the coordinator at {}: {error}",
                args.coordinator
            ),
        })?;
        let bearer = match &args.token {
            None => Bearer(None),
            Some(token) => {
                Bearer(Some(format!("Bearer {token}").parse().map_err(|_| {
                    Failure::usage("--token: must be printable ASCII")
                })?))
            }
        };
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
