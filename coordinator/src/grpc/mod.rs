//! The gRPC handlers: each converts the request, calls [`Coordinator`], converts the answer.
//! [`services`] returns the four tonic services ready for `server::build_router`.

mod design;
mod result;
mod sweep;
mod work;

use std::sync::Arc;

use deepmad_proto::v1::design_service_server::DesignServiceServer;
use deepmad_proto::v1::result_service_server::ResultServiceServer;
use deepmad_proto::v1::sweep_service_server::SweepServiceServer;
use deepmad_proto::v1::work_service_server::WorkServiceServer;

use crate::service::Coordinator;

/// The four services of `deepmad.v1`, sharing one coordinator.
#[derive(Debug)]
pub struct Services {
    pub design: DesignServiceServer<design::DesignHandler>,
    pub sweep: SweepServiceServer<sweep::SweepHandler>,
    pub work: WorkServiceServer<work::WorkHandler>,
    pub result: ResultServiceServer<result::ResultHandler>,
}

/// Returns the services over `coordinator`, with message size limits applied.
pub fn services(coordinator: Arc<Coordinator>, max_message_bytes: usize) -> Services {
    Services {
        design: DesignServiceServer::new(design::DesignHandler)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
        sweep: SweepServiceServer::new(sweep::SweepHandler::new(coordinator.clone()))
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
        work: WorkServiceServer::new(work::WorkHandler::new(coordinator.clone()))
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
        result: ResultServiceServer::new(result::ResultHandler::new(coordinator))
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
    }
}
