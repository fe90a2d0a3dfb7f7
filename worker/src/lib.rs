//! deepmad-worker: builds designed networks in candle, trains them on CPU or CUDA, and
//! reports progress and results to the coordinator.
//!
//! Not built yet: issue 4 fills this crate. It exists now so the workspace has its final
//! shape and dependency direction (`design <- proto <- worker <- cli`).
