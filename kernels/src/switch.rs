//! One process-wide switch between deepmad's implementations of the hot training layers and
//! candle's stock ops, so that the stock path stays available for comparison and as a fallback.
//!
//! - [`Kernels::Deepmad`] (the default): convolutions as deepmad's CPU kernels
//!   ([`crate::conv`]), through cuDNN in all three passes on CUDA (with the `cuda` feature);
//!   BatchNorm's training pass as one op with a written-out backward on the CPU
//!   ([`crate::batch_norm`]), cuDNN's on CUDA.
//! - [`Kernels::Stock`]: candle's `Tensor::conv2d` and BatchNorm as plain tensor ops under
//!   candle's autograd, on every device.
//!
//! Both compute the same functions (the tests compare them); only speed differs. `deepmad bench
//! --kernels stock|deepmad|both` measures one against the other.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

/// Which implementation the hot layers use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Kernels {
    #[default]
    Deepmad,
    Stock,
}

static CURRENT: AtomicU8 = AtomicU8::new(0);

impl Kernels {
    fn code(self) -> u8 {
        match self {
            Kernels::Deepmad => 0,
            Kernels::Stock => 1,
        }
    }
}

/// Returns the implementation in use (deepmad's unless [`set`] chose otherwise).
pub fn current() -> Kernels {
    match CURRENT.load(Ordering::Relaxed) {
        1 => Kernels::Stock,
        _ => Kernels::Deepmad,
    }
}

/// Chooses the implementation for the layers built or run from now on, in the whole process.
pub fn set(kernels: Kernels) {
    CURRENT.store(kernels.code(), Ordering::Relaxed);
}

/// Sets the process's kernels until the returned guard is dropped, which restores the ones in
/// use before, on every path out of the scope (an early return or a panic too).
#[must_use = "the kernels are restored when the guard is dropped"]
pub fn scoped(kernels: Kernels) -> KernelsScope {
    let previous = current();
    set(kernels);
    KernelsScope { previous }
}

/// Restores the kernels in use before [`scoped`] when dropped.
#[derive(Debug)]
pub struct KernelsScope {
    previous: Kernels,
}

impl Drop for KernelsScope {
    fn drop(&mut self) {
        set(self.previous);
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Kernels::Deepmad => "deepmad",
            Kernels::Stock => "stock",
        })
    }
}

impl FromStr for Kernels {
    type Err = String;

    fn from_str(text: &str) -> Result<Kernels, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "deepmad" => Ok(Kernels::Deepmad),
            "stock" | "candle" => Ok(Kernels::Stock),
            other => Err(format!("expected deepmad or stock, got {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_names() {
        assert_eq!("deepmad".parse::<Kernels>().unwrap(), Kernels::Deepmad);
        assert_eq!("Stock".parse::<Kernels>().unwrap(), Kernels::Stock);
        assert_eq!("candle".parse::<Kernels>().unwrap(), Kernels::Stock);
        assert!("fast".parse::<Kernels>().is_err());
        assert_eq!(Kernels::default(), Kernels::Deepmad);
    }

    #[test]
    fn a_scope_restores_the_kernels_before_it() {
        assert_eq!(current(), Kernels::Deepmad);
        {
            let _stock = scoped(Kernels::Stock);
            assert_eq!(current(), Kernels::Stock);
            {
                let _inner = scoped(Kernels::Deepmad);
                assert_eq!(current(), Kernels::Deepmad);
            }
            assert_eq!(current(), Kernels::Stock);
        }
        assert_eq!(current(), Kernels::Deepmad);
        let unwound = std::panic::catch_unwind(|| {
            let _stock = scoped(Kernels::Stock);
            panic!("a failing benchmark");
        });
        assert!(unwound.is_err());
        assert_eq!(current(), Kernels::Deepmad);
    }
}
