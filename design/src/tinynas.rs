//! TinyNAS-compatible scoring (being written).
