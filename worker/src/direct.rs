//! A direct stride-1 "same" convolution on the CPU, with no im2col.
//!
//! im2col writes every input value `k * k` times (a 3x3 convolution's columns are nine times
//! its input) and the gemm crate then packs those columns once more; for ResNet-20 the copies
//! cost about as much as a sixth of a training step. Here the input is copied once, into
//! zero-padded planes flattened with row length `width + 2 * padding` (as in
//! `conv::Padded`). On that grid every tap `(ky, kx)` is one shift, `ky * row + kx`, so an
//! AVX2 vector of 8 consecutive output positions in a row reads 8 consecutive values per input
//! channel and tap, straight from the padded planes. A register block of [`BLOCK`] output
//! channels by two such vectors (a [`Tile`]) accumulates over input channels and taps (the
//! weights packed per block so that they are read in order), as the gemm crate's microkernel
//! does over a packed matrix.
//!
//! When a map's rows are whole vectors (width 8, 16, 32, ...), the tiles are pairs of output
//! vectors and are written straight to the output. Otherwise the tiles run over the whole grid,
//! `row - width` junk positions per row included (reads that wrap into the next row), into a
//! wide buffer whose real columns are then copied out.
//!
//! Used for the forward pass of stride-1 "same" convolutions and for their input gradient,
//! which is the same kind of convolution of the output gradient with the flipped, transposed
//! weight (`conv::DenseConv::transposed_gradient`).

/// Output channels per register block.
const BLOCK: usize = 4;
/// Positions per register block (two AVX2 vectors). With three, the twelve accumulators,
/// three inputs and a weight took all sixteen registers and the compiler spilled accumulators.
const TILE: usize = 2 * VECTOR;

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
        let block_len = self.channels * shifts.len() * BLOCK;
        let planes = (self.channels, plane);
        if let Some(tiles_here) = self.row_tiles() {
            // Whole vectors of output rows: written in place.
            for (block, weights) in packed.chunks_exact(block_len).enumerate() {
                let first = block * BLOCK;
                let lanes = BLOCK.min(self.out_channels - first);
                let out = Out {
                    values: &mut output[first * pixels..],
                    plane: pixels,
                    lanes,
                };
                tiles(&scratch.padded, planes, &shifts, weights, &tiles_here, out);
            }
            return;
        }
        let wide_len = self.wide_len();
        let tiles_here: Vec<Tile> = (0..wide_len)
            .step_by(TILE)
            .map(|start| Tile {
                input: [start, start + VECTOR],
                output: [start, start + VECTOR],
            })
            .collect();
        for (block, weights) in packed.chunks_exact(block_len).enumerate() {
            let out = Out {
                values: &mut scratch.wide,
                plane: wide_len,
                lanes: BLOCK,
            };
            tiles(&scratch.padded, planes, &shifts, weights, &tiles_here, out);
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

    /// When the output rows are whole vectors (width a multiple of [`VECTOR`], an even number
    /// of vectors per plane): tiles of two consecutive output vectors, read from their rows of
    /// the padded planes and written straight to the output. No junk positions are computed
    /// (20% of the grid on 8x8 maps) and nothing is copied out of a wide buffer.
    fn row_tiles(&self) -> Option<Vec<Tile>> {
        let (width, row) = (self.width, self.row());
        let vectors = self.height * width / VECTOR;
        if width % VECTOR != 0 || vectors % 2 != 0 {
            return None;
        }
        let place = |v: usize| {
            let (y, x) = (v * VECTOR / width, v * VECTOR % width);
            (y * row + x, y * width + x)
        };
        let tiles = (0..vectors)
            .step_by(2)
            .map(|v| {
                let (first, second) = (place(v), place(v + 1));
                Tile {
                    input: [first.0, second.0],
                    output: [first.1, second.1],
                }
            })
            .collect();
        Some(tiles)
    }
}

/// Lanes per AVX2 vector.
const VECTOR: usize = 8;

/// One register block's positions: its two vectors read the padded planes at `input[v]` (plus
/// each tap's shift) and write each output plane at `output[v]`.
#[derive(Clone, Copy, Debug)]
struct Tile {
    input: [usize; 2],
    output: [usize; 2],
}

/// Where [`tiles`] writes: `lanes` planes of `plane` values each.
struct Out<'a> {
    values: &'a mut [f32],
    plane: usize,
    lanes: usize,
}

/// Every tile of one block: for each lane below `out.lanes` and vector `v`,
/// `out[lane][tile.output[v] + i] = sum over c, t of weights[c][t][lane] *
/// padded[c * plane + shifts[t] + tile.input[v] + i]`, `i < VECTOR`.
fn tiles(
    padded: &[f32],
    planes: (usize, usize),
    shifts: &[usize],
    weights: &[f32],
    tiles: &[Tile],
    out: Out,
) {
    let (channels, plane) = planes;
    let taps = shifts.len();
    let reach = shifts.iter().copied().max().unwrap_or(0);
    assert!(
        weights.len() >= channels * taps * BLOCK,
        "direct conv: weights"
    );
    assert!(out.lanes <= BLOCK, "direct conv: lanes");
    for tile in tiles {
        for v in 0..2 {
            // Every load of this vector ends at most `reach + VECTOR` past
            // `(channels - 1) * plane + tile.input[v]`; every store within its lane's plane.
            assert!(
                channels == 0
                    || (channels - 1) * plane + tile.input[v] + reach + VECTOR <= padded.len(),
                "direct conv: padded input"
            );
            assert!(
                tile.output[v] + VECTOR <= out.plane,
                "direct conv: output plane"
            );
        }
    }
    assert!(
        out.lanes == 0 || (out.lanes - 1) * out.plane + out.plane <= out.values.len(),
        "direct conv: output"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() {
        // Safety: the CPU has the features `tiles_avx2` was compiled for, and the asserts above
        // bound every offset it reaches.
        #[allow(unsafe_code)]
        unsafe {
            tiles_avx2(padded, planes, shifts, weights, tiles, out)
        };
        return;
    }
    tiles_portable(padded, planes, shifts, weights, tiles, out)
}

/// [`tiles`] in AVX2 intrinsics: the [`BLOCK`] x [`TILE`] accumulators are eight named
/// registers. (The compiler's version of [`tiles_portable`], with three vectors per tile,
/// shuffled and spilled them.)
///
/// # Safety
/// The CPU has AVX2 and FMA, and the offsets are within bounds as [`tiles`] asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
unsafe fn tiles_avx2(
    padded: &[f32],
    (channels, plane): (usize, usize),
    shifts: &[usize],
    weights: &[f32],
    tiles: &[Tile],
    out: Out,
) {
    use std::arch::x86_64::{
        __m256, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
        _mm256_storeu_ps,
    };
    const _: () = assert!(
        BLOCK == 4 && TILE == 2 * VECTOR,
        "the registers below are 4 x 2"
    );
    for tile in tiles {
        // Safety: see the function's contract.
        unsafe {
            let zero = _mm256_setzero_ps();
            let (mut a00, mut a01, mut a10, mut a11) = (zero, zero, zero, zero);
            let (mut a20, mut a21, mut a30, mut a31) = (zero, zero, zero, zero);
            let mut w = weights.as_ptr();
            for c in 0..channels {
                let base0 = padded.as_ptr().add(c * plane + tile.input[0]);
                let base1 = padded.as_ptr().add(c * plane + tile.input[1]);
                for &shift in shifts {
                    let (x0, x1) = (
                        _mm256_loadu_ps(base0.add(shift)),
                        _mm256_loadu_ps(base1.add(shift)),
                    );
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
            for (lane, vectors) in acc.iter().take(out.lanes).enumerate() {
                let plane_out = out.values.as_mut_ptr().add(lane * out.plane);
                for (v, vector) in vectors.iter().enumerate() {
                    _mm256_storeu_ps(plane_out.add(tile.output[v]), *vector);
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
    tiles: &[Tile],
    out: Out,
) {
    let taps = shifts.len();
    for tile in tiles {
        let mut acc = [[[0f32; VECTOR]; 2]; BLOCK];
        for c in 0..channels {
            let filter = &weights[c * taps * BLOCK..][..taps * BLOCK];
            for (t, &shift) in shifts.iter().enumerate() {
                let w = &filter[t * BLOCK..t * BLOCK + BLOCK];
                for (v, &input) in tile.input.iter().enumerate() {
                    let x = &padded[c * plane + input + shift..][..VECTOR];
                    for lane in 0..BLOCK {
                        for i in 0..VECTOR {
                            acc[lane][v][i] += w[lane] * x[i];
                        }
                    }
                }
            }
        }
        for (lane, vectors) in acc.iter().take(out.lanes).enumerate() {
            for (v, values) in vectors.iter().enumerate() {
                out.values[lane * out.plane + tile.output[v]..][..VECTOR].copy_from_slice(values);
            }
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
        // (in, out, height, width, kernel): the first four on the wide grid, the rest in row
        // tiles (rows of whole vectors).
        let shapes = [
            (3, 5, 7, 8, 3),
            (2, 4, 4, 5, 5),
            (4, 9, 3, 4, 3),
            (1, 1, 2, 3, 7),
            (3, 5, 4, 8, 3),
            (2, 6, 3, 16, 5),
            (5, 9, 8, 8, 3),
        ];
        for (channels, out, h, w, kernel) in shapes {
            let conv = Direct {
                channels,
                out_channels: out,
                height: h,
                width: w,
                kernel,
            };
            let side = format!("{h}x{w}");
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
