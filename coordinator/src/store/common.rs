//! The statements and logic both backends share, written once on the query layer of
//! `store/sql.rs`: reads (`common/reads.rs`), designs, downstream records, sweeps and the
//! work protocol. Each file says which parts stay dialect code in `pg/` and `sqlite/`.

pub(crate) mod designs;
pub(crate) mod downstream;
pub(crate) mod lease;
pub(crate) mod reads;
pub(crate) mod sweeps;
