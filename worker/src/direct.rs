//! A direct stride-1 "same" convolution on the CPU, with no im2col.
//!
//! im2col writes every input value `k * k` times (a 3x3 convolution's columns are nine times
//! its input) and the gemm crate then packs those columns once more; for ResNet-20 the copies
//! cost about as much as a sixth of a training step. Here the input is copied once, into
//! zero-padded planes flattened with row length `width + 2 * padding` (as in
//! `conv::Padded`). On that grid every tap `(ky, kx)` is one shift, `ky * row + kx`, so a tile
//! of [`TILE`] consecutive grid positions reads [`TILE`] consecutive values per input channel
//! and tap, straight from the padded planes. A register block of [`BLOCK`] output channels by
//! [`TILE`] positions accumulates over input channels and taps (the weights packed per block so
//! that they are read in order), as the gemm crate's microkernel does over a packed matrix.
//!
//! The grid has `row - width` junk positions per row (reads that wrap into the next row); they
//! are computed and dropped. That is 6% extra work on 32x32 maps and 20% on 8x8 maps, paid
//! for by not writing and packing nine copies of the input.
//!
//! Used for the forward pass of stride-1 "same" convolutions and for their input gradient,
//! which is the same kind of convolution of the output gradient with the flipped, transposed
//! weight (`conv::DenseConv::transposed_gradient`).

/// Output channels per register block.
const BLOCK: usize = 4;
/// Grid positions per register block (two AVX2 vectors). With three, the twelve accumulators,
/// three inputs and a weight took all sixteen registers and the compiler spilled accumulators.
const TILE: usize = 16;

/// One stride-1 convolution with padding `kernel / 2` on each side (odd `kernel`), per image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Direct {
    pub(crate) channels: usize,
    pub(crate) out_channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) kernel: usize,
}

/// Per-thread buffers of [`Direct::run`].
pub(crate) struct Scratch {
    padded: Vec<f32>,
    wide: Vec<f32>,
}

impl Direct {
    fn padding(&self) -> usize {
        self.kernel / 2
    }

    /// Row length of the padded grid.
    fn row(&self) -> usize {
        self.width + 2 * self.padding()
    }

    /// Values per padded plane.
    fn plane(&self) -> usize {
        (self.height + 2 * self.padding()) * self.row()
    }

    /// Grid positions computed per output channel: the output rows on the padded row length,
    /// rounded up to whole tiles.
    fn wide_len(&self) -> usize {
        (self.height * self.row()).div_ceil(TILE) * TILE
    }

    fn blocks(&self) -> usize {
        self.out_channels.div_ceil(BLOCK)
    }

    /// The tap offsets on the grid, in the weight's `(ky, kx)` order.
    fn shifts(&self) -> Vec<usize> {
        let (k, row) = (self.kernel, self.row());
        (0..k * k).map(|t| (t / k) * row + t % k).collect()
    }

    /// Zeroed scratch space for one thread. The padded planes' borders stay zero: every image
    /// writes the same interior positions.
    pub(crate) fn scratch(&self) -> Scratch {
        // The last tile of the last channel reads up to a tile and a filter row past the planes.
        let slack = TILE + self.kernel * self.row();
        Scratch {
            padded: vec![0f32; self.channels * self.plane() + slack],
            wide: vec![0f32; BLOCK * self.wide_len()],
        }
    }

    /// The weight `(out, in, k, k)` rearranged per block of [`BLOCK`] output channels as
    /// `[block][in][tap][BLOCK]`, zero for the missing channels of a last partial block.
    pub(crate) fn pack(&self, weight: &[f32]) -> Vec<f32> {
        let taps = self.kernel * self.kernel;
        let (channels, out) = (self.channels, self.out_channels);
        assert_eq!(
            weight.len(),
            out * channels * taps,
            "direct conv: weight size"
        );
        let mut packed = vec![0f32; self.blocks() * channels * taps * BLOCK];
        for o in 0..out {
            let (block, lane) = (o / BLOCK, o % BLOCK);
            for c in 0..channels {
                for t in 0..taps {
                    packed[((block * channels + c) * taps + t) * BLOCK + lane] =
                        weight[(o * channels + c) * taps + t];
                }
            }
        }
        packed
    }

    /// `output (out, height, width) = image (in, height, width) * weight`, the weight from
    /// [`Direct::pack`].
    pub(crate) fn run(
        &self,
        image: &[f32],
        packed: &[f32],
        scratch: &mut Scratch,
        output: &mut [f32],
    ) {
        let (p, row, plane) = (self.padding(), self.row(), self.plane());
        let (height, width) = (self.height, self.width);
        let pixels = height * width;
        assert_eq!(
            image.len(),
            self.channels * pixels,
            "direct conv: input size"
        );
        assert_eq!(
            output.len(),
            self.out_channels * pixels,
            "direct conv: output size"
        );
        for (c, source) in image.chunks_exact(pixels).enumerate() {
            let target = &mut scratch.padded[c * plane..];
            for (y, line) in source.chunks_exact(width).enumerate() {
                target[(y + p) * row + p..][..width].copy_from_slice(line);
            }
        }
        let shifts = self.shifts();
        let wide_len = self.wide_len();
        let block_len = self.channels * shifts.len() * BLOCK;
        for (block, weights) in packed.chunks_exact(block_len).enumerate() {
            tiles(
                &scratch.padded,
                (self.channels, plane),
                &shifts,
                weights,
                (&mut scratch.wide, wide_len),
            );
            let first = block * BLOCK;
            let count = BLOCK.min(self.out_channels - first);
            for (lane, wide) in scratch.wide.chunks_exact(wide_len).take(count).enumerate() {
                let plane_out = &mut output[(first + lane) * pixels..][..pixels];
                for (y, line) in plane_out.chunks_exact_mut(width).enumerate() {
                    line.copy_from_slice(&wide[y * row..][..width]);
                }
            }
        }
    }
}

/// Every tile of one block: `wide[lane][i] = sum over c, t of weights[c][t][lane] *
/// padded[c * plane + shifts[t] + i]`.
fn tiles(
    padded: &[f32],
    planes: (usize, usize),
    shifts: &[usize],
    weights: &[f32],
    wide: (&mut [f32], usize),
) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() {
        // Safety: the CPU has the features `tiles_avx2` was compiled for.
        #[allow(unsafe_code)]
        unsafe {
            tiles_avx2(padded, planes, shifts, weights, wide)
        };
        return;
    }
    tiles_portable(padded, planes, shifts, weights, wide)
}

/// [`tiles`] in AVX2 intrinsics: the [`BLOCK`] x [`TILE`] accumulators are eight named
/// registers. (The compiler's version of [`tiles_portable`] shuffled and spilled them.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
fn tiles_avx2(
    padded: &[f32],
    (channels, plane): (usize, usize),
    shifts: &[usize],
    weights: &[f32],
    (wide, wide_len): (&mut [f32], usize),
) {
    use std::arch::x86_64::{
        __m256, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
        _mm256_storeu_ps,
    };
    const _: () = assert!(BLOCK == 4 && TILE == 16, "the registers below are 4 x 2");
    let taps = shifts.len();
    let reach = shifts.iter().copied().max().unwrap_or(0);
    assert!(
        weights.len() >= channels * taps * BLOCK,
        "direct conv: weights"
    );
    assert!(wide.len() >= BLOCK * wide_len, "direct conv: output");
    assert!(wide_len % TILE == 0, "direct conv: whole tiles");
    if channels == 0 {
        wide.fill(0.0);
        return;
    }
    for start in (0..wide_len).step_by(TILE) {
        // Every load below is at most `reach + TILE` past `c * plane + start`, c < channels.
        assert!(
            (channels - 1) * plane + start + reach + TILE <= padded.len(),
            "direct conv: padded input"
        );
        // Safety: the asserts above bound every pointer offset below: input loads by the last
        // one, weight reads by `channels * taps * BLOCK`, stores by `BLOCK * wide_len`.
        unsafe {
            let zero = _mm256_setzero_ps();
            let (mut a00, mut a01, mut a10, mut a11) = (zero, zero, zero, zero);
            let (mut a20, mut a21, mut a30, mut a31) = (zero, zero, zero, zero);
            let mut w = weights.as_ptr();
            for c in 0..channels {
                let base = padded.as_ptr().add(c * plane + start);
                for &shift in shifts {
                    let x = base.add(shift);
                    let (x0, x1) = (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)));
                    let w0 = _mm256_broadcast_ss(&*w);
                    a00 = _mm256_fmadd_ps(w0, x0, a00);
                    a01 = _mm256_fmadd_ps(w0, x1, a01);
                    let w1 = _mm256_broadcast_ss(&*w.add(1));
                    a10 = _mm256_fmadd_ps(w1, x0, a10);
                    a11 = _mm256_fmadd_ps(w1, x1, a11);
                    let w2 = _mm256_broadcast_ss(&*w.add(2));
                    a20 = _mm256_fmadd_ps(w2, x0, a20);
                    a21 = _mm256_fmadd_ps(w2, x1, a21);
                    let w3 = _mm256_broadcast_ss(&*w.add(3));
                    a30 = _mm256_fmadd_ps(w3, x0, a30);
                    a31 = _mm256_fmadd_ps(w3, x1, a31);
                    w = w.add(BLOCK);
                }
            }
            let acc: [[__m256; 2]; BLOCK] = [[a00, a01], [a10, a11], [a20, a21], [a30, a31]];
            for (lane, vectors) in acc.iter().enumerate() {
                let out = wide.as_mut_ptr().add(lane * wide_len + start);
                for (v, vector) in vectors.iter().enumerate() {
                    _mm256_storeu_ps(out.add(8 * v), *vector);
                }
            }
        }
    }
}

/// [`tiles`] for CPUs without AVX2 and FMA, and other architectures.
fn tiles_portable(
    padded: &[f32],
    (channels, plane): (usize, usize),
    shifts: &[usize],
    weights: &[f32],
    (wide, wide_len): (&mut [f32], usize),
) {
    let taps = shifts.len();
    let reach = shifts.last().copied().unwrap_or(0);
    for start in (0..wide_len).step_by(TILE) {
        let mut acc = [[0f32; TILE]; BLOCK];
        for c in 0..channels {
            let base = c * plane + start;
            // One bounds check per channel instead of one per tap.
            let window = &padded[base..base + reach + TILE];
            let filter = &weights[c * taps * BLOCK..][..taps * BLOCK];
            for (t, &shift) in shifts.iter().enumerate() {
                let x: &[f32; TILE] = window[shift..shift + TILE]
                    .try_into()
                    .expect("a tile of the window");
                let w: &[f32; BLOCK] = filter[t * BLOCK..t * BLOCK + BLOCK]
                    .try_into()
                    .expect("a block of the filter");
                for lane in 0..BLOCK {
                    for i in 0..TILE {
                        acc[lane][i] += w[lane] * x[i];
                    }
                }
            }
        }
        for (lane, values) in acc.iter().enumerate() {
            wide[lane * wide_len + start..][..TILE].copy_from_slice(values);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the definition, on shapes with partial blocks and tiles, several kernel sizes and
    /// maps narrower than the filter.
    #[test]
    fn matches_the_definition() {
        for (channels, out, side, kernel) in
            [(3, 5, 7, 3), (2, 4, 4, 5), (4, 9, 3, 3), (1, 1, 2, 7)]
        {
            let conv = Direct {
                channels,
                out_channels: out,
                height: side,
                width: side + 1,
                kernel,
            };
            let (h, w) = (side, side + 1);
            let value =
                |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 97) as f32 / 48.0 - 1.0;
            let image: Vec<f32> = (0..channels * h * w).map(|i| value(i, 1)).collect();
            let weight: Vec<f32> = (0..out * channels * kernel * kernel)
                .map(|i| value(i, 2))
                .collect();
            let mut output = vec![f32::NAN; out * h * w];
            let mut scratch = conv.scratch();
            let packed = conv.pack(&weight);
            // Twice through the same scratch: the second image must not see the first.
            conv.run(&vec![9.0; image.len()], &packed, &mut scratch, &mut output);
            conv.run(&image, &packed, &mut scratch, &mut output);
            let p = kernel / 2;
            for o in 0..out {
                for y in 0..h {
                    for x in 0..w {
                        let mut expected = 0f32;
                        for c in 0..channels {
                            for ky in 0..kernel {
                                for kx in 0..kernel {
                                    let (iy, ix) = (y + ky, x + kx);
                                    if iy < p || ix < p || iy - p >= h || ix - p >= w {
                                        continue;
                                    }
                                    expected += weight
                                        [((o * channels + c) * kernel + ky) * kernel + kx]
                                        * image[(c * h + iy - p) * w + ix - p];
                                }
                            }
                        }
                        let got = output[(o * h + y) * w + x];
                        assert!(
                            (got - expected).abs() < 1e-4,
                            "{channels}->{out} {side} k{kernel}: ({o}, {y}, {x}) {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }
}
