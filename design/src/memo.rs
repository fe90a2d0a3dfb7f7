//! Remembered computations for the scoring folds.
//!
//! Scoring walks every layer of a network and takes a logarithm of every width. The solver
//! scores millions of candidates that differ from each other in one or two stages, so it
//! passes memos: [`Memo`] remembers the value a pure function returned for a key, and
//! [`LnMemo`] the logarithms. A remembered value is the one computed before for the same
//! key, so scores are bit-for-bit those of the direct computation ([`Direct`]).

use std::hash::{Hash, Hasher};

/// A source of natural logarithms.
pub(crate) trait Ln {
    fn ln(&mut self, x: f64) -> f64;
}

/// Computes everything afresh: `f64::ln` every time.
pub(crate) struct Direct;

impl Ln for Direct {
    #[inline]
    fn ln(&mut self, x: f64) -> f64 {
        x.ln()
    }
}

/// A direct-mapped memo: each key hashes to one slot, which holds the last key seen there
/// and its value. A miss computes the value and takes the slot.
pub(crate) struct Memo<K, V> {
    slots: Vec<Option<(K, V)>>,
    shift: u32,
}

impl<K: Hash + Eq + Copy, V: Copy> Memo<K, V> {
    /// A memo of `2^bits` slots.
    pub(crate) fn new(bits: u32) -> Memo<K, V> {
        Memo {
            slots: vec![None; 1 << bits],
            shift: 64 - bits,
        }
    }

    /// Returns the value remembered for `key`, or computes, remembers and returns it.
    #[inline]
    pub(crate) fn get_or(&mut self, key: K, compute: impl FnOnce() -> V) -> V {
        let mut hasher = FxHasher(0);
        key.hash(&mut hasher);
        let index = hasher.finish().checked_shr(self.shift).unwrap_or(0) as usize;
        let slot = &mut self.slots[index];
        match slot {
            Some((seen, value)) if *seen == key => *value,
            _ => {
                let value = compute();
                *slot = Some((key, value));
                value
            }
        }
    }
}

/// Small integers (channel counts, squared sides, most layer widths) whose logarithms
/// [`LnMemo`] keeps in a table indexed by the integer itself.
const SMALL: usize = 1 << 16;

/// The logarithms of one solve: a table for small integers, a memo for the rest.
pub(crate) struct LnMemo {
    small: Vec<f64>,
    large: Memo<u64, f64>,
}

impl LnMemo {
    pub(crate) fn new() -> LnMemo {
        LnMemo {
            // NaN marks a slot not computed yet (no small integer's logarithm is NaN).
            small: vec![f64::NAN; SMALL],
            large: Memo::new(12),
        }
    }
}

impl Ln for LnMemo {
    #[inline]
    fn ln(&mut self, x: f64) -> f64 {
        // `x as usize` saturates (0 for NaN and negatives), so the round trip checks that
        // `x` is exactly a small integer.
        let index = x as usize;
        if index < SMALL && index as f64 == x {
            let slot = &mut self.small[index];
            if slot.is_nan() {
                *slot = x.ln();
            }
            *slot
        } else {
            self.large.get_or(x.to_bits(), || x.ln())
        }
    }
}

/// A fast multiplicative hash of small integer keys (the rustc "Fx" hash's mixing step);
/// the memo takes the top bits of its result.
struct FxHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.add(u64::from(byte));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn write_isize(&mut self, n: isize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_memo_returns_what_ln_returns() {
        let mut memo = LnMemo::new();
        // Twice over, so the second pass reads remembered values (and colliding slots refill).
        for _ in 0..2 {
            for step in 1..40_000u32 {
                let x = f64::from(step) * 8.0 / 3.0;
                assert_eq!(memo.ln(x).to_bits(), x.ln().to_bits(), "ln({x})");
            }
        }
        for x in [
            0.0,
            -0.0,
            1.0,
            2.0,
            65_535.0,
            65_536.0,
            1e12,
            0.5,
            -1.0,
            f64::NAN,
        ] {
            for _ in 0..2 {
                assert_eq!(memo.ln(x).to_bits(), x.ln().to_bits(), "ln({x})");
            }
        }
    }

    #[test]
    fn colliding_keys_take_the_slot_and_compute_again() {
        // One slot: every key collides.
        let mut memo: Memo<(u32, bool), u32> = Memo::new(0);
        let mut computed = 0;
        let mut square = |memo: &mut Memo<(u32, bool), u32>, n: u32| {
            memo.get_or((n, true), || {
                computed += 1;
                n * n
            })
        };
        assert_eq!(square(&mut memo, 3), 9);
        assert_eq!(square(&mut memo, 3), 9);
        assert_eq!(square(&mut memo, 4), 16);
        assert_eq!(square(&mut memo, 3), 9);
        assert_eq!(computed, 3);
    }
}
