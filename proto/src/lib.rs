//! deepmad-proto: the gRPC wire types of deepmad (`deepmad.v1`) and their conversions to and
//! from the design crate's domain types.
//!
//! Not built yet: issue 3 adds the `.proto` files, a `build.rs` that needs no system `protoc`,
//! and `convert.rs`. Nothing in this crate pretends to work before then.
