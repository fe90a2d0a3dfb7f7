//! Reproducible randomness: every random choice of a trial comes from a ChaCha8 generator
//! derived from the trial's seed and what the choice is for, so a resumed run draws exactly
//! what an uninterrupted run would (no generator state needs saving).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Returns the generator for `purpose` (for example `"shuffle"`) at `indices` (for example
/// the epoch and batch): ChaCha8 keyed by SHA-256 of the seed, the purpose and the indices.
pub fn derived(seed: u64, purpose: &str, indices: &[u64]) -> ChaCha8Rng {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update((purpose.len() as u64).to_le_bytes());
    hasher.update(purpose.as_bytes());
    for index in indices {
        hasher.update(index.to_le_bytes());
    }
    ChaCha8Rng::from_seed(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    #[test]
    fn same_inputs_same_stream_and_any_change_differs() {
        let draw =
            |seed, purpose, indices: &[u64]| -> u64 { derived(seed, purpose, indices).random() };
        assert_eq!(draw(1, "shuffle", &[3]), draw(1, "shuffle", &[3]));
        assert_ne!(draw(1, "shuffle", &[3]), draw(2, "shuffle", &[3]));
        assert_ne!(draw(1, "shuffle", &[3]), draw(1, "augment", &[3]));
        assert_ne!(draw(1, "shuffle", &[3]), draw(1, "shuffle", &[4]));
        assert_ne!(draw(1, "shuffle", &[3, 0]), draw(1, "shuffle", &[3]));
    }
}
