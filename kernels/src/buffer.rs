//! Output buffers that a CPU kernel writes in full, allocated without a zero fill.
//!
//! Why: `vec![0.0; len]` writes every element before the kernel writes it again. Each training
//! step frees the activation-sized buffers of the step before, glibc hands the same memory back
//! from its free lists, and `calloc` then clears it: one extra pass over memory per output. On
//! ResNet-20 at batch 128 those fills (the convolution's output, BatchNorm's output, the fused
//! op's gradient buffer) were 3-8% of a step (perf, `memset`, on an AMD EPYC and an Intel Xeon).
//!
//! [`filled_by`] skips the fill in release builds and poisons the buffer in test and debug
//! builds: every element starts as a NaN with a payload no arithmetic produces, and after the
//! kernel ran [`filled_by`] asserts that none is left. A kernel that skips an element fails its
//! tests at once instead of leaving stale memory in a result.

/// The poison of debug builds: a signalling NaN (quiet bit clear) with a fixed payload.
/// Arithmetic on a NaN returns a quiet one, so only an element nothing wrote keeps these bits.
const POISON: u32 = 0x7fa5_a5a5;

/// A `len`-element vector whose every element `fill` writes, without zero-filling it first.
/// Debug builds check that it wrote them all and panic, naming `what`, if not.
///
/// # Safety
/// `fill` must write every element of the slice it is given before it reads that element, and
/// must write them all. In release builds the slice starts uninitialised, so reading an element
/// before writing it, or leaving one unwritten, is undefined behaviour.
pub(crate) unsafe fn filled_by(len: usize, what: &str, fill: impl FnOnce(&mut [f32])) -> Vec<f32> {
    if cfg!(debug_assertions) {
        let mut buffer = vec![f32::from_bits(POISON); len];
        fill(&mut buffer);
        if let Some(index) = buffer.iter().position(|v| v.to_bits() == POISON) {
            panic!("{what}: element {index} of {len} was never written");
        }
        return buffer;
    }
    let mut buffer = Box::<[f32]>::new_uninit_slice(len);
    // SAFETY: `buffer` holds `len` f32 slots. This function's caller guarantees that `fill`
    // writes every element before reading it, so no uninitialised value is ever read through
    // this slice (the contract candle's own CPU kernels keep when they write into
    // `Vec::spare_capacity_mut`); debug builds check it on every call. After `fill`, every slot
    // is initialised.
    let buffer = unsafe {
        fill(std::slice::from_raw_parts_mut(
            buffer.as_mut_ptr().cast::<f32>(),
            len,
        ));
        buffer.assume_init()
    };
    buffer.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_what_the_kernel_wrote() {
        // SAFETY: the closure writes every element.
        let values = unsafe {
            filled_by(5, "ramp", |out| {
                for (i, value) in out.iter_mut().enumerate() {
                    *value = i as f32;
                }
            })
        };
        assert_eq!(values, [0.0, 1.0, 2.0, 3.0, 4.0]);
        // NaN and infinity are values like any other.
        // SAFETY: the closure writes every element.
        let values = unsafe {
            filled_by(2, "special", |out| {
                out.copy_from_slice(&[f32::NAN, 1.0 / 0.0])
            })
        };
        assert!(values[0].is_nan() && values[1].is_infinite());
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "half: element 2 of 4 was never written")]
    fn an_element_left_unwritten_fails_in_debug_builds() {
        // SAFETY: not kept: debug builds (the only ones this test runs in) poison the buffer
        // instead of leaving it uninitialised, and panic before returning it.
        unsafe { filled_by(4, "half", |out| out[..2].fill(1.0)) };
    }

    #[test]
    fn arithmetic_on_the_poison_does_not_reproduce_it() {
        let poison = f32::from_bits(POISON);
        for value in [
            poison + 1.0,
            poison * 2.0,
            -poison,
            poison.max(0.0),
            0f32.max(poison),
        ] {
            assert_ne!(value.to_bits(), POISON);
        }
    }
}
