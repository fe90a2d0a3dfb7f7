//! deepmad-coordinator: the gRPC service that expands sweeps into designs and trials, stores
//! them (PostgreSQL or embedded SQLite), leases training work to workers and serves
//! leaderboards.
//!
//! Not built yet: issue 3 fills this crate. It exists now so the workspace has its final
//! shape and dependency direction (`design <- proto <- coordinator <- cli`).
