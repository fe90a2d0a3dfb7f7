//! A direct stride-1 "same" convolution on the CPU, with no im2col.
//!
//! im2col writes every input value `k * k` times (a 3x3 convolution's columns are nine times
//! its input) and the gemm crate then packs those columns once more; for ResNet-20 the copies
//! cost about as much as a sixth of a training step. Here the input is copied once, into
//! zero-padded planes flattened with row length `width + 2 * padding` (as in
//! `conv::Padded`). On that grid every tap `(ky, kx)` is one shift, `ky * row + kx`, so a
//! vector of consecutive output positions in a row reads as many consecutive values per input
//! channel and tap, straight from the padded planes. A register block of output channels by two
//! such vectors (a [`Tile`]) accumulates over input channels and taps (the weights packed per
//! block so that they are read in order), as the gemm crate's microkernel does over a packed
//! matrix. The tiling depends on the instruction set ([`Kernel`]): 4 channels by two 8-lane
//! vectors with AVX2 (16 registers), 8 channels by two 16-lane vectors with AVX-512 (32
//! registers), picked at run time.
//!
//! When a map's rows are whole vectors (width 8, 16, 32, ... for 8 lanes; 16, 32, ... and 8 as
//! pairs of rows for 16 lanes), the tiles are pairs of output vectors and are written straight
//! to the output. Otherwise the tiles run over the whole grid, `row - width` junk positions per
//! row included (reads that wrap into the next row), into a wide buffer whose real columns are
//! then copied out.
//!
//! Used for the forward pass of stride-1 "same" convolutions and for their input gradient,
//! which is the same kind of convolution of the output gradient with the flipped, transposed
//! weight (`conv::DenseConv::transposed_gradient`).

/// The register tiling of one instruction set. A tile is [`Kernel::block`] output channels by
/// two vectors of [`Kernel::vector`] positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Plain Rust, tiled as [`Kernel::Avx2`]: any CPU.
    Portable,
    /// AVX2 + FMA: 4 channels by 2 vectors of 8, eight of the sixteen ymm registers. With three
    /// vectors the twelve accumulators, three inputs and a weight took all sixteen and the
    /// compiler spilled accumulators.
    Avx2,
    /// AVX-512F: 8 channels by 2 vectors of 16, sixteen of the thirty-two zmm registers. Maps
    /// whose rows are 8 wide load each vector from two rows.
    Avx512,
}

impl Kernel {
    /// The widest kernel this CPU runs, or the one `DEEPMAD_CPU_DIRECT` names (`avx512`, `avx2`,
    /// `portable`; read once), for comparing them in one binary. A name this CPU cannot run, or
    /// an unknown one, is an error naming it.
    pub(crate) fn chosen() -> candle_core::Result<Kernel> {
        static CHOICE: std::sync::OnceLock<Result<Kernel, String>> = std::sync::OnceLock::new();
        CHOICE
            .get_or_init(|| {
                let available = Kernel::available();
                let name = match std::env::var("DEEPMAD_CPU_DIRECT") {
                    Err(_) => return Ok(available[0]),
                    Ok(name) if name.is_empty() => return Ok(available[0]),
                    Ok(name) => name,
                };
                let wanted = match name.as_str() {
                    "avx512" => Kernel::Avx512,
                    "avx2" => Kernel::Avx2,
                    "portable" => Kernel::Portable,
                    _ => {
                        return Err(format!(
                            "DEEPMAD_CPU_DIRECT={name:?}: expected \"avx512\", \"avx2\" or \
                             \"portable\""
                        ))
                    }
                };
                if available.contains(&wanted) {
                    Ok(wanted)
                } else {
                    Err(format!(
                        "DEEPMAD_CPU_DIRECT={name:?}: this CPU lacks the instructions for it"
                    ))
                }
            })
            .clone()
            .map_err(candle_core::Error::Msg)
    }

    /// The kernels this CPU runs, widest first.
    pub(crate) fn available() -> Vec<Kernel> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if crate::simd::has_avx512() {
                kernels.push(Kernel::Avx512);
            }
            if crate::simd::has_avx2_fma() {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels.push(Kernel::Portable);
        kernels
    }

    /// Positions per vector.
    fn vector(self) -> usize {
        match self {
            Kernel::Avx512 => 16,
            Kernel::Avx2 | Kernel::Portable => 8,
        }
    }

    /// Output channels per tile.
    fn block(self) -> usize {
        match self {
            Kernel::Avx512 => 8,
            Kernel::Avx2 | Kernel::Portable => 4,
        }
    }

    /// Positions per tile.
    fn tile(self) -> usize {
        2 * self.vector()
    }
}

/// One stride-1 convolution with padding `kernel / 2` on each side (odd `kernel`), per image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Direct {
    pub(crate) channels: usize,
    pub(crate) out_channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) kernel: usize,
    /// The register tiling; [`Direct::pack`] and [`Direct::run`] must see the same.
    pub(crate) simd: Kernel,
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
        let tile = self.simd.tile();
        (self.height * self.row()).div_ceil(tile) * tile
    }

    fn blocks(&self) -> usize {
        self.out_channels.div_ceil(self.simd.block())
    }

    /// The tap offsets on the grid, in the weight's `(ky, kx)` order.
    fn shifts(&self) -> Vec<usize> {
        let (k, row) = (self.kernel, self.row());
        (0..k * k).map(|t| (t / k) * row + t % k).collect()
    }

    /// Values past the padded planes that the last tile of the last channel may read: up to a
    /// tile and a filter row.
    fn scratch_slack(&self) -> usize {
        2 * self.simd.tile() + self.kernel * self.row()
    }

    /// Zeroed scratch space for one thread. The padded planes' borders stay zero: every image
    /// writes the same interior positions.
    pub(crate) fn scratch(&self) -> Scratch {
        Scratch {
            padded: vec![0f32; self.channels * self.plane() + self.scratch_slack()],
            wide: vec![0f32; self.simd.block() * self.wide_len()],
        }
    }

    /// The weight `(out, in, k, k)` rearranged per block of [`Kernel::block`] output channels as
    /// `[block][in][tap][lane]`, zero for the missing channels of a last partial block.
    pub(crate) fn pack(&self, weight: &[f32]) -> Vec<f32> {
        let taps = self.kernel * self.kernel;
        let (channels, out, block_size) = (self.channels, self.out_channels, self.simd.block());
        assert_eq!(
            weight.len(),
            out * channels * taps,
            "direct conv: weight size"
        );
        let mut packed = vec![0f32; self.blocks() * channels * taps * block_size];
        for o in 0..out {
            let (block, lane) = (o / block_size, o % block_size);
            for c in 0..channels {
                for t in 0..taps {
                    packed[((block * channels + c) * taps + t) * block_size + lane] =
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
        let (row, plane) = (self.row(), self.plane());
        let (height, width) = (self.height, self.width);
        let (vector, block_size) = (self.simd.vector(), self.simd.block());
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
        self.fill(image, &mut scratch.padded);
        let shifts = self.shifts();
        let block_len = self.channels * shifts.len() * block_size;
        let planes = (self.channels, plane);
        if let Some((tiles_here, upper)) = self.row_tiles() {
            // Whole vectors of output rows: written in place.
            for (block, weights) in packed.chunks_exact(block_len).enumerate() {
                let first = block * block_size;
                let lanes = block_size.min(self.out_channels - first);
                let out = Out {
                    values: &mut output[first * pixels..],
                    plane: pixels,
                    lanes,
                };
                let grid = Grid {
                    padded: &scratch.padded,
                    planes,
                    shifts: &shifts,
                    upper,
                };
                tiles(self.simd, grid, weights, &tiles_here, out);
            }
            return;
        }
        let wide_len = self.wide_len();
        let tiles_here: Vec<Tile> = (0..wide_len)
            .step_by(self.simd.tile())
            .map(|start| Tile {
                input: [start, start + vector],
                output: [start, start + vector],
            })
            .collect();
        for (block, weights) in packed.chunks_exact(block_len).enumerate() {
            let out = Out {
                values: &mut scratch.wide,
                plane: wide_len,
                lanes: block_size,
            };
            let grid = Grid {
                padded: &scratch.padded,
                planes,
                shifts: &shifts,
                upper: vector / 2,
            };
            tiles(self.simd, grid, weights, &tiles_here, out);
            let first = block * block_size;
            let count = block_size.min(self.out_channels - first);
            for (lane, wide) in scratch.wide.chunks_exact(wide_len).take(count).enumerate() {
                let plane_out = &mut output[(first + lane) * pixels..][..pixels];
                for (y, line) in plane_out.chunks_exact_mut(width).enumerate() {
                    line.copy_from_slice(&wide[y * row..][..width]);
                }
            }
        }
    }

    /// Copies the image's planes into the interior of the first `channels` padded planes.
    fn fill(&self, image: &[f32], padded: &mut [f32]) {
        let (p, row, plane, width) = (self.padding(), self.row(), self.plane(), self.width);
        for (c, source) in image.chunks_exact(self.height * width).enumerate() {
            let target = &mut padded[c * plane..];
            for (y, line) in source.chunks_exact(width).enumerate() {
                target[(y + p) * row + p..][..width].copy_from_slice(line);
            }
        }
    }

    /// The weight gradient computed on the padded grid as well (no im2col), where there is a
    /// kernel for it: AVX-512 or AVX2, and output rows of whole vectors ([`Direct::row_tiles`]).
    /// Elsewhere the caller takes im2col and a matrix product.
    pub(crate) fn weight_gradient(&self) -> Option<WeightGradient> {
        if self.simd == Kernel::Portable {
            return None;
        }
        let (tiles, upper) = self.row_tiles()?;
        let vectors = tiles
            .iter()
            .flat_map(|tile| {
                [
                    (tile.input[0], tile.output[0]),
                    (tile.input[1], tile.output[1]),
                ]
            })
            .collect();
        let pixels = self.height * self.width;
        Some(WeightGradient {
            direct: *self,
            vectors,
            upper,
            images: (WEIGHT_GRADIENT_POSITIONS / pixels).clamp(1, 16),
        })
    }

    /// When the output rows are whole vectors (width a multiple of the vector, an even number of
    /// vectors per plane): tiles of two consecutive output vectors, read from their rows of the
    /// padded planes and written straight to the output. No junk positions are computed (20% of
    /// the grid on 8x8 maps) and nothing is copied out of a wide buffer. A 16-lane vector on
    /// rows 8 wide covers two rows: its output is contiguous, its input two half-vectors a
    /// padded row apart. Returns the tiles and the offset of each vector's upper half.
    fn row_tiles(&self) -> Option<(Vec<Tile>, usize)> {
        let (width, row, vector) = (self.width, self.row(), self.simd.vector());
        let half = vector / 2;
        let vectors = self.height * width / vector;
        // Vector `v`'s input offset on the grid and output offset in the plane, and where its
        // upper half starts relative to its lower half.
        let two_rows =
            width == half && self.simd == Kernel::Avx512 && self.height.is_multiple_of(2);
        if width % vector != 0 && !two_rows {
            return None;
        }
        let place = |v: usize| {
            if two_rows {
                (2 * v * row, 2 * v * width)
            } else {
                let (y, x) = (v * vector / width, v * vector % width);
                (y * row + x, y * width + x)
            }
        };
        let upper = if two_rows { row } else { half };
        if vectors == 0 || !vectors.is_multiple_of(2) {
            return None;
        }
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
        Some((tiles, upper))
    }
}

/// One 16-lane vector at `$at` in an AVX-512 function: contiguous, or with `$split` its upper
/// 8 lanes `$upper` values after its lower 8. A macro, not a function or closure, so that it is
/// compiled with the calling function's target features; the caller is responsible for the
/// pointer's bounds.
#[cfg(target_arch = "x86_64")]
macro_rules! load_16 {
    ($split:expr, $upper:expr, $at:expr) => {{
        use std::arch::x86_64::{
            _mm256_castps_pd, _mm256_loadu_ps, _mm512_castpd_ps, _mm512_castps256_ps512,
            _mm512_castps_pd, _mm512_insertf64x4, _mm512_loadu_ps,
        };
        let at: *const f32 = $at;
        if $split {
            let low = _mm512_castps256_ps512(_mm256_loadu_ps(at));
            let high = _mm256_castps_pd(_mm256_loadu_ps(at.add($upper)));
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(low), high))
        } else {
            _mm512_loadu_ps(at)
        }
    }};
}

/// Output positions that [`WeightGradient`] sums over per tile before reducing its registers:
/// small maps take several images at a time.
const WEIGHT_GRADIENT_POSITIONS: usize = 512;

/// The weight gradient of a [`Direct`] convolution, `grad_w[o][c][t] = sum over images and
/// output positions q of grad_y[o][q] * padded_x[c][q + shifts[t]]`, on the padded grid of the
/// input. A tile is 8 output channels by 3 taps: 24 zmm accumulators, each a sum over every
/// position of [`WeightGradient::images`] images, reduced to one number at the end; per vector of
/// positions it loads 3 input vectors (the taps' shifts) and 8 output-gradient vectors for 24
/// multiply-adds.
pub(crate) struct WeightGradient {
    direct: Direct,
    /// Per output vector: its offset on the padded grid and in the output plane.
    vectors: Vec<(usize, usize)>,
    /// The offset of a vector's upper half from its lower half on the grid.
    upper: usize,
    /// Images per call of [`WeightGradient::accumulate`].
    images: usize,
}

impl WeightGradient {
    /// How many images [`WeightGradient::accumulate`] takes at most.
    pub(crate) fn images(&self) -> usize {
        self.images
    }

    /// Zeroed padded planes for [`WeightGradient::images`] images and room for their packed
    /// output gradients, reused across calls.
    pub(crate) fn scratch(&self) -> WeightScratch {
        let d = &self.direct;
        WeightScratch {
            padded: vec![0f32; self.images * d.channels * d.plane() + d.scratch_slack()],
            packed: vec![0f32; self.images * self.vectors.len() * d.simd.block() * d.simd.vector()],
        }
    }

    /// `sums[(c * taps + t) * out + o] += grad_w[o][c][t]` over the given images (at most
    /// [`WeightGradient::images`], `(in, height, width)` each) and their output gradients
    /// (`(out, height, width)` each): the weight gradient's rows `c * k * k + t`, transposed, as
    /// `DenseConv`'s matrix product accumulates it.
    pub(crate) fn accumulate(
        &self,
        images: &[f32],
        grad_ys: &[f32],
        scratch: &mut WeightScratch,
        sums: &mut [f32],
    ) {
        let d = &self.direct;
        let padded = &mut scratch.padded;
        let pixels = d.height * d.width;
        let count = images.len() / (d.channels * pixels).max(1);
        assert!(
            count <= self.images && images.len() == count * d.channels * pixels,
            "direct weight gradient: images"
        );
        assert_eq!(
            grad_ys.len(),
            count * d.out_channels * pixels,
            "direct weight gradient: output gradients"
        );
        let taps = d.kernel * d.kernel;
        assert_eq!(
            sums.len(),
            d.channels * taps * d.out_channels,
            "direct weight gradient: sums"
        );
        let plane_set = d.channels * d.plane();
        for (j, image) in images.chunks_exact(d.channels * pixels).enumerate() {
            d.fill(image, &mut padded[j * plane_set..]);
        }
        let shifts = d.shifts();
        let reach = shifts.iter().copied().max().unwrap_or(0);
        let half = d.simd.vector() / 2;
        for &(input, output) in &self.vectors {
            // Every load: a padded plane's vector and its taps, an output plane's vector.
            assert!(
                d.channels == 0
                    || (count * d.channels - 1) * d.plane() + input + reach + self.upper + half
                        <= padded.len(),
                "direct weight gradient: padded input"
            );
            assert!(
                output + 2 * half <= pixels,
                "direct weight gradient: output"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx512() && d.simd == Kernel::Avx512 {
            let grid = Grid {
                padded,
                planes: (d.channels, d.plane()),
                shifts: &shifts,
                upper: self.upper,
            };
            // SAFETY: the CPU has AVX-512F; the asserts above bound every load, and the
            // output gradient is indexed within `count * out * pixels`.
            unsafe {
                if self.upper == half {
                    weight_tiles_avx512::<false>(
                        grid,
                        grad_ys,
                        (count, d.out_channels, pixels),
                        &self.vectors,
                        (&mut scratch.packed, sums),
                    )
                } else {
                    weight_tiles_avx512::<true>(
                        grid,
                        grad_ys,
                        (count, d.out_channels, pixels),
                        &self.vectors,
                        (&mut scratch.packed, sums),
                    )
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2_fma() && d.simd == Kernel::Avx2 {
            let grid = Grid {
                padded,
                planes: (d.channels, d.plane()),
                shifts: &shifts,
                upper: self.upper,
            };
            // SAFETY: the CPU has AVX2 and FMA; the asserts above bound every load (an 8-lane
            // vector is contiguous on the grid), and the output gradient is indexed within
            // `count * out * pixels`.
            unsafe {
                weight_tiles_avx2(
                    grid,
                    grad_ys,
                    (count, d.out_channels, pixels),
                    &self.vectors,
                    (&mut scratch.packed, sums),
                )
            }
            return;
        }
        panic!(
            "direct weight gradient: this CPU cannot run the {:?} kernel",
            d.simd
        )
    }
}

/// Per-thread buffers of [`WeightGradient::accumulate`].
pub(crate) struct WeightScratch {
    padded: Vec<f32>,
    packed: Vec<f32>,
}

/// [`WeightGradient::accumulate`]'s tiles in AVX-512 intrinsics. `grid` holds `count` images'
/// padded planes one after the other; `grad_ys` is `(count, out, pixels)`. Per block of 8
/// output channels the output gradients are first packed as `[image][vector][lane][16]`, so
/// that the tile's loop reads them at fixed offsets from one pointer.
///
/// # Safety
/// The CPU has AVX-512F, and the offsets are within bounds as the caller asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weight_tiles_avx512<const SPLIT: bool>(
    grid: Grid,
    grad_ys: &[f32],
    (count, out, pixels): (usize, usize, usize),
    vectors: &[(usize, usize)],
    (packed, sums): (&mut [f32], &mut [f32]),
) {
    use std::arch::x86_64::{
        _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_reduce_add_ps, _mm512_setzero_ps,
    };
    const BLOCK: usize = 8;
    const LANES: usize = 16;
    const TAPS: usize = 3;
    let (channels, plane) = grid.planes;
    let taps = grid.shifts.len();
    let upper = grid.upper;
    let per_image = vectors.len() * BLOCK * LANES;
    let packed = &mut packed[..count * per_image];
    for first in (0..out).step_by(BLOCK) {
        let lanes = BLOCK.min(out - first);
        pack_gradients::<BLOCK, LANES>(grad_ys, (first, lanes), (out, pixels), vectors, packed);
        for c in 0..channels {
            for chunk in (0..taps).step_by(TAPS) {
                let used = TAPS.min(taps - chunk);
                // A last chunk of fewer taps repeats its first tap's shift and drops the sums.
                let shift = |i: usize| grid.shifts[chunk + if i < used { i } else { 0 }];
                let (s0, s1, s2) = (shift(0), shift(1), shift(2));
                // SAFETY: see the function's contract; `packed` holds `count * per_image`.
                unsafe {
                    let zero = _mm512_setzero_ps();
                    let mut acc = [[zero; TAPS]; BLOCK];
                    for image in 0..count {
                        let x = grid.padded.as_ptr().add((image * channels + c) * plane);
                        let mut g = packed.as_ptr().add(image * per_image);
                        for &(input, _) in vectors {
                            let at = x.add(input);
                            let x0 = load_16!(SPLIT, upper, at.add(s0));
                            let x1 = load_16!(SPLIT, upper, at.add(s1));
                            let x2 = load_16!(SPLIT, upper, at.add(s2));
                            for (lane, tap_sums) in acc.iter_mut().enumerate() {
                                let gy = _mm512_loadu_ps(g.add(lane * LANES));
                                tap_sums[0] = _mm512_fmadd_ps(gy, x0, tap_sums[0]);
                                tap_sums[1] = _mm512_fmadd_ps(gy, x1, tap_sums[1]);
                                tap_sums[2] = _mm512_fmadd_ps(gy, x2, tap_sums[2]);
                            }
                            g = g.add(BLOCK * LANES);
                        }
                    }
                    for (lane, tap_sums) in acc.iter().enumerate().take(lanes) {
                        for (i, &sum) in tap_sums.iter().enumerate().take(used) {
                            sums[(c * taps + chunk + i) * out + first + lane] +=
                                _mm512_reduce_add_ps(sum);
                        }
                    }
                }
            }
        }
    }
}

/// [`weight_tiles_avx512`]'s twin in AVX2: a tile is 4 output channels by 3 taps, 12 of the 16
/// ymm registers, over 8-lane vectors (contiguous on the grid: AVX2 row tiles need rows of
/// whole vectors). The output gradients are packed as `[image][vector][lane][8]`.
///
/// # Safety
/// The CPU has AVX2 and FMA, and the offsets are within bounds as the caller asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weight_tiles_avx2(
    grid: Grid,
    grad_ys: &[f32],
    (count, out, pixels): (usize, usize, usize),
    vectors: &[(usize, usize)],
    (packed, sums): (&mut [f32], &mut [f32]),
) {
    use std::arch::x86_64::{
        _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_loadu_ps,
        _mm256_setzero_ps, _mm_add_ps, _mm_cvtss_f32, _mm_hadd_ps,
    };
    const BLOCK: usize = 4;
    const LANES: usize = 8;
    const TAPS: usize = 3;
    let (channels, plane) = grid.planes;
    let taps = grid.shifts.len();
    let per_image = vectors.len() * BLOCK * LANES;
    let packed = &mut packed[..count * per_image];
    for first in (0..out).step_by(BLOCK) {
        let lanes = BLOCK.min(out - first);
        pack_gradients::<BLOCK, LANES>(grad_ys, (first, lanes), (out, pixels), vectors, packed);
        for c in 0..channels {
            for chunk in (0..taps).step_by(TAPS) {
                let used = TAPS.min(taps - chunk);
                // A last chunk of fewer taps repeats its first tap's shift and drops the sums.
                let shift = |i: usize| grid.shifts[chunk + if i < used { i } else { 0 }];
                let (s0, s1, s2) = (shift(0), shift(1), shift(2));
                // SAFETY: see the function's contract; `packed` holds `count * per_image`.
                unsafe {
                    let zero = _mm256_setzero_ps();
                    let mut acc = [[zero; TAPS]; BLOCK];
                    for image in 0..count {
                        let x = grid.padded.as_ptr().add((image * channels + c) * plane);
                        let mut g = packed.as_ptr().add(image * per_image);
                        for &(input, _) in vectors {
                            let at = x.add(input);
                            let x0 = _mm256_loadu_ps(at.add(s0));
                            let x1 = _mm256_loadu_ps(at.add(s1));
                            let x2 = _mm256_loadu_ps(at.add(s2));
                            for (lane, tap_sums) in acc.iter_mut().enumerate() {
                                let gy = _mm256_loadu_ps(g.add(lane * LANES));
                                tap_sums[0] = _mm256_fmadd_ps(gy, x0, tap_sums[0]);
                                tap_sums[1] = _mm256_fmadd_ps(gy, x1, tap_sums[1]);
                                tap_sums[2] = _mm256_fmadd_ps(gy, x2, tap_sums[2]);
                            }
                            g = g.add(BLOCK * LANES);
                        }
                    }
                    for (lane, tap_sums) in acc.iter().enumerate().take(lanes) {
                        for (i, &sum) in tap_sums.iter().enumerate().take(used) {
                            let quad = _mm_add_ps(
                                _mm256_castps256_ps128(sum),
                                _mm256_extractf128_ps::<1>(sum),
                            );
                            let pair = _mm_hadd_ps(quad, quad);
                            sums[(c * taps + chunk + i) * out + first + lane] +=
                                _mm_cvtss_f32(_mm_hadd_ps(pair, pair));
                        }
                    }
                }
            }
        }
    }
}

/// Packs the output gradients of channels `first..first + lanes` as
/// `[image][vector][lane][LANES]` (channels past `lanes` zero, up to `BLOCK`), for the weight
/// gradient's tiles to read at fixed offsets from one pointer.
#[inline(always)]
fn pack_gradients<const BLOCK: usize, const LANES: usize>(
    grad_ys: &[f32],
    (first, lanes): (usize, usize),
    (out, pixels): (usize, usize),
    vectors: &[(usize, usize)],
    packed: &mut [f32],
) {
    let per_image = vectors.len() * BLOCK * LANES;
    for (image, target) in packed.chunks_exact_mut(per_image).enumerate() {
        for (&(_, output), vector) in vectors.iter().zip(target.chunks_exact_mut(BLOCK * LANES)) {
            for (lane, values) in vector.chunks_exact_mut(LANES).enumerate() {
                if lane < lanes {
                    let plane_start = (image * out + first + lane) * pixels + output;
                    values.copy_from_slice(&grad_ys[plane_start..][..LANES]);
                } else {
                    values.fill(0.0);
                }
            }
        }
    }
}

/// One register block's positions: its two vectors read the padded planes at `input[v]` (plus
/// each tap's shift; the upper half of a vector at [`Grid::upper`] past its lower half) and
/// write each output plane at `output[v]`, contiguously.
#[derive(Clone, Copy, Debug)]
struct Tile {
    input: [usize; 2],
    output: [usize; 2],
}

/// What [`tiles`] reads: `planes.0` zero-padded planes of `planes.1` values each, the taps'
/// offsets on them, and where a vector's upper half starts relative to its lower half (half a
/// vector when the vector is contiguous on the grid).
#[derive(Clone, Copy)]
struct Grid<'a> {
    padded: &'a [f32],
    planes: (usize, usize),
    shifts: &'a [usize],
    upper: usize,
}

/// Where [`tiles`] writes: `lanes` planes of `plane` values each.
struct Out<'a> {
    values: &'a mut [f32],
    plane: usize,
    lanes: usize,
}

/// Every tile of one block: for each lane below `out.lanes`, vector `v` and position
/// `i < vector`, `out[lane][tile.output[v] + i] = sum over c, t of weights[c][t][lane] *
/// padded[c * plane + shifts[t] + tile.input[v] + i']`, where `i' = i` in the lower half of the
/// vector and `grid.upper + i - vector / 2` in the upper.
fn tiles(simd: Kernel, grid: Grid, weights: &[f32], tiles: &[Tile], out: Out) {
    let (channels, plane) = grid.planes;
    let (vector, block) = (simd.vector(), simd.block());
    let half = vector / 2;
    let taps = grid.shifts.len();
    let reach = grid.shifts.iter().copied().max().unwrap_or(0);
    assert!(
        weights.len() >= channels * taps * block,
        "direct conv: weights"
    );
    assert!(out.lanes <= block, "direct conv: lanes");
    assert!(grid.upper >= half, "direct conv: vector halves overlap");
    for tile in tiles {
        for v in 0..2 {
            // Every load of this vector ends at most `reach + upper + half` past
            // `(channels - 1) * plane + tile.input[v]`; every store within its lane's plane.
            assert!(
                channels == 0
                    || (channels - 1) * plane + tile.input[v] + reach + grid.upper + half
                        <= grid.padded.len(),
                "direct conv: padded input"
            );
            assert!(
                tile.output[v] + vector <= out.plane,
                "direct conv: output plane"
            );
        }
    }
    assert!(
        out.lanes == 0 || (out.lanes - 1) * out.plane + out.plane <= out.values.len(),
        "direct conv: output"
    );
    match simd {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 if crate::simd::has_avx512() => {
            // SAFETY: the guard checked that the CPU has AVX-512F, and the asserts above bound
            // every offset the kernel reaches.
            unsafe {
                if grid.upper == half {
                    tiles_avx512::<false>(grid, weights, tiles, out)
                } else {
                    tiles_avx512::<true>(grid, weights, tiles, out)
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if crate::simd::has_avx2_fma() => {
            assert_eq!(grid.upper, half, "direct conv: AVX2 vectors are contiguous");
            // SAFETY: the guard checked that the CPU has AVX2 and FMA, and the asserts above
            // bound every offset the kernel reaches.
            unsafe { tiles_avx2(grid, weights, tiles, out) }
        }
        Kernel::Portable => tiles_portable(simd, grid, weights, tiles, out),
        _ => panic!("direct conv: this CPU cannot run the {simd:?} kernel"),
    }
}

/// [`tiles`] in AVX2 intrinsics for [`Kernel::Avx2`]: the 4 x 2 accumulators are eight named
/// registers. (The compiler's version of [`tiles_portable`], with three vectors per tile,
/// shuffled and spilled them.) Its vectors are contiguous on the grid.
///
/// # Safety
/// The CPU has AVX2 and FMA, and the offsets are within bounds as [`tiles`] asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tiles_avx2(grid: Grid, weights: &[f32], tiles: &[Tile], out: Out) {
    use std::arch::x86_64::{
        __m256, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
        _mm256_storeu_ps,
    };
    const BLOCK: usize = 4;
    let (channels, plane) = grid.planes;
    for tile in tiles {
        // SAFETY: see the function's contract.
        unsafe {
            let zero = _mm256_setzero_ps();
            let (mut a00, mut a01, mut a10, mut a11) = (zero, zero, zero, zero);
            let (mut a20, mut a21, mut a30, mut a31) = (zero, zero, zero, zero);
            let mut w = weights.as_ptr();
            for c in 0..channels {
                let base0 = grid.padded.as_ptr().add(c * plane + tile.input[0]);
                let base1 = grid.padded.as_ptr().add(c * plane + tile.input[1]);
                for &shift in grid.shifts {
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

/// [`tiles`] in AVX-512 intrinsics for [`Kernel::Avx512`]: 8 x 2 accumulators in sixteen zmm
/// registers, two inputs and a broadcast weight beside them. With `SPLIT` a vector's halves
/// are loaded separately, [`Grid::upper`] apart, and joined.
///
/// # Safety
/// The CPU has AVX-512F, and the offsets are within bounds as [`tiles`] asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tiles_avx512<const SPLIT: bool>(grid: Grid, weights: &[f32], tiles: &[Tile], out: Out) {
    use std::arch::x86_64::{_mm512_fmadd_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps};
    const BLOCK: usize = 8;
    let (channels, plane) = grid.planes;
    let upper = grid.upper;
    for tile in tiles {
        // SAFETY: see the function's contract.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; BLOCK];
            let mut w = weights.as_ptr();
            for c in 0..channels {
                let base0 = grid.padded.as_ptr().add(c * plane + tile.input[0]);
                let base1 = grid.padded.as_ptr().add(c * plane + tile.input[1]);
                for &shift in grid.shifts {
                    let (x0, x1) = (
                        load_16!(SPLIT, upper, base0.add(shift)),
                        load_16!(SPLIT, upper, base1.add(shift)),
                    );
                    for (lane, pair) in acc.iter_mut().enumerate() {
                        let weight = _mm512_set1_ps(*w.add(lane));
                        pair[0] = _mm512_fmadd_ps(weight, x0, pair[0]);
                        pair[1] = _mm512_fmadd_ps(weight, x1, pair[1]);
                    }
                    w = w.add(BLOCK);
                }
            }
            for (lane, vectors) in acc.iter().take(out.lanes).enumerate() {
                let plane_out = out.values.as_mut_ptr().add(lane * out.plane);
                for (v, vector) in vectors.iter().enumerate() {
                    _mm512_storeu_ps(plane_out.add(tile.output[v]), *vector);
                }
            }
        }
    }
}

/// [`tiles`] for CPUs without AVX2 and FMA, and other architectures, tiled as `simd` is.
fn tiles_portable(simd: Kernel, grid: Grid, weights: &[f32], tiles: &[Tile], out: Out) {
    let (channels, plane) = grid.planes;
    let (vector, block) = (simd.vector(), simd.block());
    let half = vector / 2;
    let taps = grid.shifts.len();
    let mut acc = vec![0f32; block * 2 * vector];
    for tile in tiles {
        acc.fill(0.0);
        for c in 0..channels {
            let filter = &weights[c * taps * block..][..taps * block];
            for (t, &shift) in grid.shifts.iter().enumerate() {
                let w = &filter[t * block..][..block];
                for (v, &input) in tile.input.iter().enumerate() {
                    let start = c * plane + input + shift;
                    let low = &grid.padded[start..][..half];
                    let high = &grid.padded[start + grid.upper..][..half];
                    for (lane, &weight) in w.iter().enumerate() {
                        let sums = &mut acc[(lane * 2 + v) * vector..][..vector];
                        let (sums_low, sums_high) = sums.split_at_mut(half);
                        for (sum, x) in sums_low.iter_mut().zip(low) {
                            *sum += weight * x;
                        }
                        for (sum, x) in sums_high.iter_mut().zip(high) {
                            *sum += weight * x;
                        }
                    }
                }
            }
        }
        for lane in 0..out.lanes {
            for (v, &output) in tile.output.iter().enumerate() {
                out.values[lane * out.plane + output..][..vector]
                    .copy_from_slice(&acc[(lane * 2 + v) * vector..][..vector]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel this CPU runs on every shape `(in, out, height, width, kernel)`.
    fn cases(shapes: &[(usize, usize, usize, usize, usize)]) -> Vec<Direct> {
        Kernel::available()
            .into_iter()
            .flat_map(|simd| {
                shapes.iter().map(
                    move |&(channels, out_channels, height, width, kernel)| Direct {
                        channels,
                        out_channels,
                        height,
                        width,
                        kernel,
                        simd,
                    },
                )
            })
            .collect()
    }

    /// Deterministic test values in [-1, 1), a different sequence per `salt`.
    fn value(i: usize, salt: usize) -> f32 {
        ((i * 7919 + salt * 104_729) % 97) as f32 / 48.0 - 1.0
    }

    /// The unpadded input position that output position `y` reads through tap row (or column)
    /// `k` with padding `p`, on a side of `size`; `None` in the padding.
    fn source(y: usize, k: usize, p: usize, size: usize) -> Option<usize> {
        (y + k).checked_sub(p).filter(|&i| i < size)
    }

    /// Every kernel this CPU runs, against the definition, on shapes with partial blocks and
    /// tiles, several kernel sizes and maps narrower than the filter.
    #[test]
    fn matches_the_definition() {
        // (in, out, height, width, kernel): the first four on the wide grid, the rest in row
        // tiles of 8-lane vectors; of those, the 16-lane kernel tiles the 8-wide maps with
        // vectors on two rows, and rows of 16 and 32 when there is an even number of vectors.
        let shapes = [
            (3, 5, 7, 8, 3),
            (2, 4, 4, 5, 5),
            (4, 9, 3, 4, 3),
            (1, 1, 2, 3, 7),
            (3, 5, 4, 8, 3),
            (2, 6, 3, 16, 5),
            (5, 9, 8, 8, 3),
            (2, 6, 2, 16, 3),
            (3, 17, 3, 32, 3),
            (4, 8, 4, 8, 5),
        ];
        for conv in cases(&shapes) {
            let (channels, out, h, w) = (conv.channels, conv.out_channels, conv.height, conv.width);
            let (kernel, simd) = (conv.kernel, conv.simd);
            let side = format!("{h}x{w}");
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
                                    let (Some(iy), Some(ix)) =
                                        (source(y, ky, p, h), source(x, kx, p, w))
                                    else {
                                        continue;
                                    };
                                    expected += weight
                                        [((o * channels + c) * kernel + ky) * kernel + kx]
                                        * image[(c * h + iy) * w + ix];
                                }
                            }
                        }
                        let got = output[(o * h + y) * w + x];
                        assert!(
                            (got - expected).abs() < 1e-4,
                            "{simd:?} {channels}->{out} {side} k{kernel}: ({o}, {y}, {x}) {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }

    /// The weight gradient kernel, where this CPU has one, against the definition: several
    /// images per call, partial channel blocks and tap chunks (5x5 has 25 taps), 8-wide maps
    /// (vectors on two rows) and wider ones, added onto what the sums held.
    #[test]
    fn weight_gradient_matches_the_definition() {
        // (in, out, height, width, kernel)
        let shapes = [
            (3, 5, 4, 8, 3),
            (2, 9, 2, 16, 5),
            (4, 8, 8, 8, 3),
            (1, 3, 2, 32, 3),
        ];
        let mut ran = 0;
        for conv in cases(&shapes) {
            let (channels, out, h, w) = (conv.channels, conv.out_channels, conv.height, conv.width);
            let (kernel, simd) = (conv.kernel, conv.simd);
            let Some(gradient) = conv.weight_gradient() else {
                assert_eq!(
                    simd,
                    Kernel::Portable,
                    "{channels}->{out} {h}x{w} k{kernel}"
                );
                continue;
            };
            ran += 1;
            let count = gradient.images().min(3);
            let pixels = h * w;
            let images: Vec<f32> = (0..count * channels * pixels)
                .map(|i| value(i, 1))
                .collect();
            let grad_ys: Vec<f32> = (0..count * out * pixels).map(|i| value(i, 2)).collect();
            let taps = kernel * kernel;
            let rows = channels * taps;
            let mut sums: Vec<f32> = (0..rows * out).map(|i| value(i, 3)).collect();
            let before = sums.clone();
            let mut scratch = gradient.scratch();
            // Twice through the same scratch: the second call's images must not see the first's.
            let mut first = vec![0f32; rows * out];
            let nines = vec![9.0; images.len()];
            gradient.accumulate(&nines, &grad_ys, &mut scratch, &mut first);
            gradient.accumulate(&images, &grad_ys, &mut scratch, &mut sums);
            let p = kernel / 2;
            for o in 0..out {
                for c in 0..channels {
                    for t in 0..taps {
                        let (ky, kx) = (t / kernel, t % kernel);
                        let mut expected = f64::from(before[(c * taps + t) * out + o]);
                        for j in 0..count {
                            for y in 0..h {
                                for x in 0..w {
                                    let (Some(iy), Some(ix)) =
                                        (source(y, ky, p, h), source(x, kx, p, w))
                                    else {
                                        continue;
                                    };
                                    let gy = grad_ys[((j * out + o) * h + y) * w + x];
                                    let xv = images[((j * channels + c) * h + iy) * w + ix];
                                    expected += f64::from(gy) * f64::from(xv);
                                }
                            }
                        }
                        let got = f64::from(sums[(c * taps + t) * out + o]);
                        assert!(
                            (got - expected).abs() < 1e-3,
                            "{simd:?} {channels}->{out} {h}x{w} k{kernel}: ({o}, {c}, {t}) {got} \
                             vs {expected}"
                        );
                    }
                }
            }
        }
        let vector_kernels = Kernel::available()
            .into_iter()
            .filter(|&simd| simd != Kernel::Portable)
            .count();
        assert_eq!(
            ran,
            vector_kernels * shapes.len(),
            "every shape has row tiles"
        );
    }
}
