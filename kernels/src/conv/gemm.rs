//! Single-threaded matrix products over strided slices, with the gemm crate candle itself uses.

/// One operand of [`matmul`]: a row-major matrix (whose rows may be longer than the columns
/// used) or the transpose of one.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix whose rows start `row_stride` elements apart.
    pub(super) fn row_major(data: &'a [f32], row_stride: usize) -> Operand<'a> {
        Operand {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows start `row_stride` elements apart.
    pub(super) fn transposed(data: &'a [f32], row_stride: usize) -> Operand<'a> {
        Operand {
            data,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    /// One past the largest index a `rows x cols` view reaches.
    fn reach(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return 0;
        }
        (rows - 1) * self.row_stride + (cols - 1) * self.col_stride + 1
    }
}

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)`, `dst` row-major with rows `dst.1` apart,
/// on the calling thread.
pub(super) fn matmul(
    (dst, dst_row_stride): (&mut [f32], usize),
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    dims: (usize, usize, usize),
) {
    matmul_strided((dst, dst_row_stride, 1), accumulate, lhs, rhs, dims);
}

/// [`matmul`] with a destination of any strides (`dst.1` between rows, `dst.2` between
/// columns). The gemm crate computes a column-major destination without transposing the
/// problem, which decides which operand it packs.
// The gemm crate's entry point takes raw pointers and strides; the asserts make it sound.
pub(super) fn matmul_strided(
    (dst, dst_row_stride, dst_col_stride): (&mut [f32], usize, usize),
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    (m, n, k): (usize, usize, usize),
) {
    let dst_view = Operand {
        data: dst,
        row_stride: dst_row_stride,
        col_stride: dst_col_stride,
    };
    assert!(
        dst_view.reach(m, n) <= dst.len(),
        "matmul: destination too small"
    );
    assert!(
        lhs.reach(m, k) <= lhs.data.len(),
        "matmul: left operand too small"
    );
    assert!(
        rhs.reach(k, n) <= rhs.data.len(),
        "matmul: right operand too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above bound every index the strides reach in all three matrices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_col_stride as isize,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
