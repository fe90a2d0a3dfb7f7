//! deepmad-coordinator: the service that expands sweeps into designs and trials, stores them
//! (PostgreSQL, or SQLite embedded), leases training work to workers and serves leaderboards.
//!
//! Start reading at [`model`] (ids and states), then [`store`] (one type per backend, one method
//! per use case, the lease protocol's transactions).
#![forbid(unsafe_code)]

pub mod analytics;
pub mod app;
pub mod auth;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod server;
pub mod service;
pub mod settings;
pub mod store;
pub mod sweep;
pub mod web;
pub mod weights;
