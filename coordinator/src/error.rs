//! The coordinator's one error type at its gRPC boundary, and its one mapping onto gRPC
//! status codes.
//!
//! Every use case returns [`enum@Error`]; handlers return `Result<_, tonic::Status>` and convert
//! with `?`. The `From<Error> for Status` match is exhaustive (no `_` arm), so a new variant
//! must choose its code. Internal errors give the client a generic message and log the detail.

use deepmad_design::DesignError;
use deepmad_proto::convert::ConvertError;
use thiserror::Error;
use tonic::{Code, Status};

use crate::model::AttemptId;
use crate::store::StoreError;

/// Everything a coordinator use case can fail with.
#[derive(Debug, Error)]
pub enum Error {
    /// Bad input; `field` names the request field (`grid.rho`, `stage_strides`).
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The named record does not exist.
    #[error("{what} {id} not found")]
    NotFound { what: String, id: String },
    /// A report carried a lease token that does not hold the attempt's lease.
    #[error("attempt {attempt} is not the lease holder")]
    NotLeaseHolder { attempt: AttemptId },
    /// A concurrent write won a race on the named constraint; the request may be retried.
    #[error("conflicting concurrent update ({constraint})")]
    Conflict { constraint: String },
    #[error("missing or unknown credentials")]
    Unauthenticated,
    #[error("the caller's role may not do this")]
    PermissionDenied,
    /// The database cannot be reached now; the detail is logged, not sent.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// A limit was hit; `what` says which and what the limit is.
    #[error("{what}")]
    ResourceExhausted { what: String },
    /// A bug or a database error; the client sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let message = error.to_string();
        match error {
            Error::InvalidArgument { .. } => Status::new(Code::InvalidArgument, message),
            Error::NotFound { .. } => Status::new(Code::NotFound, message),
            Error::NotLeaseHolder { .. } => Status::new(Code::FailedPrecondition, message),
            Error::Conflict { .. } => Status::new(Code::Aborted, message),
            Error::Unauthenticated => Status::new(Code::Unauthenticated, message),
            Error::PermissionDenied => Status::new(Code::PermissionDenied, message),
            Error::Unavailable(detail) => {
                tracing::warn!(%detail, "answering unavailable");
                Status::new(Code::Unavailable, "service unavailable; retry later")
            }
            Error::ResourceExhausted { .. } => Status::new(Code::ResourceExhausted, message),
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::new(Code::Internal, "internal error")
            }
        }
    }
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Error {
        match error {
            StoreError::NotFound { what, id } => Error::NotFound {
                what: what.to_string(),
                id,
            },
            StoreError::NotLeaseHolder { attempt } => Error::NotLeaseHolder { attempt },
            StoreError::Conflict { constraint } => Error::Conflict { constraint },
            StoreError::Unavailable(detail) => Error::Unavailable(detail),
            StoreError::Database(detail) => Error::Internal(format!("database: {detail}")),
            StoreError::Migration(detail) => Error::Internal(format!("migration: {detail}")),
        }
    }
}

impl From<ConvertError> for Error {
    fn from(error: ConvertError) -> Error {
        Error::InvalidArgument {
            field: error.field,
            reason: error.reason,
        }
    }
}

impl From<DesignError> for Error {
    /// Every design error is about the request's input: `InvalidArgument`, naming the input
    /// (an infeasible problem names the budget that cannot be met).
    fn from(error: DesignError) -> Error {
        let field = match &error {
            DesignError::InvalidNetwork { .. } | DesignError::Malformed { .. } => "architecture",
            DesignError::InvalidRecipe { .. } | DesignError::MalformedRecipe { .. } => "recipe",
            DesignError::InvalidDatasetSpec { .. } => "dataset",
            DesignError::UnknownNetwork { .. } => "builtin",
            DesignError::InvalidInput { field, .. } => field,
            DesignError::Unsupported { .. } => "objective",
            DesignError::Infeasible { constraint, .. } => constraint,
        };
        Error::InvalidArgument {
            field: field.to_string(),
            reason: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_its_code() {
        let cases = [
            (
                Error::InvalidArgument {
                    field: "grid.rho".into(),
                    reason: "must be positive".into(),
                },
                Code::InvalidArgument,
            ),
            (
                Error::NotFound {
                    what: "sweep".into(),
                    id: "x".into(),
                },
                Code::NotFound,
            ),
            (
                Error::NotLeaseHolder {
                    attempt: AttemptId::new(),
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Conflict {
                    constraint: "trials_key".into(),
                },
                Code::Aborted,
            ),
            (Error::Unauthenticated, Code::Unauthenticated),
            (Error::PermissionDenied, Code::PermissionDenied),
            (
                Error::Unavailable("pool timed out".into()),
                Code::Unavailable,
            ),
            (
                Error::ResourceExhausted {
                    what: "too many grid points".into(),
                },
                Code::ResourceExhausted,
            ),
            (Error::Internal("boom".into()), Code::Internal),
        ];
        for (error, code) in cases {
            assert_eq!(Status::from(error).code(), code);
        }
    }

    #[test]
    fn invalid_arguments_name_the_field() {
        let status = Status::from(Error::InvalidArgument {
            field: "grid.rho".into(),
            reason: "must be positive, got -1".into(),
        });
        assert_eq!(
            status.message(),
            "invalid grid.rho: must be positive, got -1"
        );
    }

    #[test]
    fn internal_and_database_details_stay_in_the_log() {
        let secret = "password authentication failed for user deepmad at 10.0.0.5";
        for error in [
            Error::from(StoreError::Database(secret.into())),
            Error::from(StoreError::Migration(secret.into())),
            Error::from(StoreError::Unavailable(secret.into())),
        ] {
            let status = Status::from(error);
            assert!(!status.message().contains("password"), "{status:?}");
        }
        let status = Status::from(Error::from(StoreError::Database(secret.into())));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn store_errors_keep_their_meaning() {
        let not_found = Error::from(StoreError::NotFound {
            what: "trial",
            id: "t1".into(),
        });
        assert_eq!(Status::from(not_found).message(), "trial t1 not found");
        let conflict = Error::from(StoreError::Conflict {
            constraint: "sweeps_pkey".into(),
        });
        assert!(
            matches!(conflict, Error::Conflict { ref constraint } if constraint == "sweeps_pkey")
        );
    }

    #[test]
    fn design_and_convert_errors_are_invalid_arguments() {
        let infeasible = Error::from(DesignError::Infeasible {
            constraint: "params",
            budget: "1.0K".into(),
            detail: "the smallest design needs 9.5K params".into(),
        });
        assert!(matches!(&infeasible, Error::InvalidArgument { field, .. } if field == "params"));
        let convert = Error::from(ConvertError::new("stage_strides", "strides must be 1 or 2"));
        let status = Status::from(convert);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "invalid stage_strides: strides must be 1 or 2"
        );
    }
}
