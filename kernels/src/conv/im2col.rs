//! Columns of a convolution's input windows (im2col) and their sum back into an image
//! (col2im), in the layout `(in_channels * k * k, out_height * out_width)` with row
//! `c * k * k + ky * k + kx`, which matches the weight's row-major `(out, in, k, k)` layout.

use super::Windows;

/// The output positions `lo..hi` along one axis whose input coordinate at kernel offset `tap`
/// lies inside `0..len`, and the input coordinate of `lo`.
pub(super) fn valid_range(
    w: &Windows,
    tap: usize,
    len: usize,
    out_len: usize,
) -> (usize, usize, usize) {
    let lo = w.padding.saturating_sub(tap).div_ceil(w.stride);
    let hi = match (len - 1 + w.padding).checked_sub(tap) {
        Some(last) => (last / w.stride + 1).min(out_len),
        None => 0,
    };
    let first = lo * w.stride + tap - w.padding;
    (lo, hi.max(lo), first)
}

/// Copies the windows of one image (`channels x height x width`) into its columns, one row of
/// `out_plane` values per (channel, tap): row `r` is
/// `cols[r * row_stride + offset..][..out_plane]`. Only in-image positions are written, so the
/// padding positions keep whatever they held (zero, when the scratch was zeroed once).
pub(super) fn im2col_into(
    w: &Windows,
    image: &[f32],
    cols: &mut [f32],
    row_stride: usize,
    offset: usize,
) {
    let (out_h, out_w) = (w.out_height(), w.out_width());
    if w.stride == 1 && out_h == w.height && out_w == w.width {
        return im2col_same(w, image, cols, row_stride, offset);
    }
    let plane = w.height * w.width;
    let rows = w.channels * w.kernel * w.kernel;
    for row_index in 0..rows {
        let row = &mut cols[row_index * row_stride + offset..][..out_h * out_w];
        let channel = row_index / (w.kernel * w.kernel);
        let (ky, kx) = ((row_index / w.kernel) % w.kernel, row_index % w.kernel);
        let source = &image[channel * plane..(channel + 1) * plane];
        let (y_lo, y_hi, y_first) = valid_range(w, ky, w.height, out_h);
        let (x_lo, x_hi, x_first) = valid_range(w, kx, w.width, out_w);
        for (step, oy) in (y_lo..y_hi).enumerate() {
            let line = &source[(y_first + step * w.stride) * w.width..];
            let target = &mut row[oy * out_w + x_lo..oy * out_w + x_hi];
            if w.stride == 1 {
                target.copy_from_slice(&line[x_first..x_first + target.len()]);
            } else {
                for (offset, value) in target.iter_mut().enumerate() {
                    *value = line[x_first + offset * w.stride];
                }
            }
        }
    }
}

/// [`im2col_into`] for stride 1 and "same" padding, where each row is the channel's plane
/// shifted by `(ky - p) * width + (kx - p)`: one long copy per row, then zeros where the shift
/// ran off the top or bottom (the ends of the row) or wrapped across a side (a few columns per
/// output row). The general loop copies each output row separately, as many short copies.
fn im2col_same(w: &Windows, image: &[f32], cols: &mut [f32], row_stride: usize, offset: usize) {
    let (width, plane, k, p) = (w.width, w.height * w.width, w.kernel, w.padding);
    for row_index in 0..w.channels * k * k {
        let row = &mut cols[row_index * row_stride + offset..][..plane];
        let channel = row_index / (k * k);
        let (ky, kx) = ((row_index / k) % k, row_index % k);
        let source = &image[channel * plane..(channel + 1) * plane];
        let dx = kx as isize - p as isize;
        let shift = (ky as isize - p as isize) * width as isize + dx;
        // row[i] = source[i + shift] for i + shift in 0..plane.
        let lo = (-shift).clamp(0, plane as isize) as usize;
        let hi = (plane as isize - shift).clamp(lo as isize, plane as isize) as usize;
        if lo < hi {
            let start = (lo as isize + shift) as usize;
            row[lo..hi].copy_from_slice(&source[start..start + (hi - lo)]);
        }
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
        // Columns whose tap falls left or right of the image.
        let (left, right) = (dx.min(0).unsigned_abs(), dx.max(0) as usize);
        if left + right > 0 {
            for line in row.chunks_exact_mut(width) {
                line[..left.min(width)].fill(0.0);
                line[width - right.min(width)..].fill(0.0);
            }
        }
    }
}

crate::simd::multiversion! {
/// Adds one image's columns, laid out as in [`im2col_into`], back onto its pixels (the
/// adjoint of im2col).
pub(super) fn col2im_from(w: &Windows, cols: &[f32], row_stride: usize, offset: usize, image: &mut [f32]) {
    let (out_h, out_w) = (w.out_height(), w.out_width());
    let plane = w.height * w.width;
    let rows = w.channels * w.kernel * w.kernel;
    for row_index in 0..rows {
        let row = &cols[row_index * row_stride + offset..][..out_h * out_w];
        let channel = row_index / (w.kernel * w.kernel);
        let (ky, kx) = ((row_index / w.kernel) % w.kernel, row_index % w.kernel);
        let target = &mut image[channel * plane..(channel + 1) * plane];
        let (y_lo, y_hi, y_first) = valid_range(w, ky, w.height, out_h);
        let (x_lo, x_hi, x_first) = valid_range(w, kx, w.width, out_w);
        for (step, oy) in (y_lo..y_hi).enumerate() {
            let line = &mut target[(y_first + step * w.stride) * w.width..];
            let source = &row[oy * out_w + x_lo..oy * out_w + x_hi];
            if w.stride == 1 {
                // Contiguous on both sides, so the compiler vectorises the adds.
                let target = &mut line[x_first..x_first + source.len()];
                for (pixel, value) in target.iter_mut().zip(source) {
                    *pixel += value;
                }
            } else {
                for (offset, value) in source.iter().enumerate() {
                    line[x_first + offset * w.stride] += value;
                }
            }
        }
    }
}
}
