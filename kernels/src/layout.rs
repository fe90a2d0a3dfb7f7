//! What every op reads its tensors through: a convolution's window geometry ([`Windows`]) and
//! the contiguous f32 values of a CPU tensor ([`contiguous_f32`]). The bottom of the crate:
//! it imports no other module of it.

use candle_core::{CpuStorage, Layout, Shape, Tensor};

/// The geometry of one convolution's input windows (NCHW input, square `k x k` kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Windows {
    pub(crate) batch: usize,
    pub(crate) channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl Windows {
    /// The windows of convolving `xs` `(batch, in, height, width)` with `weight`
    /// `(out, in / groups, k, k)`, and the output channel count.
    pub(crate) fn of(
        xs: &Tensor,
        weight: &Tensor,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<(Windows, usize)> {
        let (batch, channels, height, width) = xs.dims4()?;
        let (out_channels, _, kernel, _) = weight.dims4()?;
        let windows = Windows {
            batch,
            channels,
            height,
            width,
            kernel,
            stride,
            padding,
        };
        Ok((windows, out_channels))
    }

    pub(crate) fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }

    pub(crate) fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }

    pub(crate) fn cols_shape(&self) -> Shape {
        let rows = self.channels * self.kernel * self.kernel;
        (self.batch, rows, self.out_height() * self.out_width()).into()
    }
}

/// The values of a contiguous f32 CPU tensor; other types and layouts are errors naming `op`.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: only f32 tensors are supported");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op }),
    }
}
