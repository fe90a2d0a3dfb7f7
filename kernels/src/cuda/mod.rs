//! deepmad's own CUDA kernels, for the elementwise work where a chain of candle ops would cost a
//! kernel launch and an allocation per op: the fused SGD update ([`crate::sgd`]), the
//! BatchNorm running statistics (`cuda::cudnn`) and the activations ([`crate::activation`]).
//!
//! The kernels are CUDA C below, compiled once per process by NVRTC (which candle's CUDA backend
//! already links) and loaded through candle's module cache, so a CUDA build needs no extra build
//! step and the PTX always matches the driver of the machine it runs on.

// Launching a kernel passes raw arguments to the driver; each launch below says why it is sound.

pub(crate) mod cudnn;

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDevice;
use candle_core::{CudaStorage, DType, Layout};
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

const MODULE: &str = "deepmad_kernels";

const SOURCE: &str = r#"
extern "C" __global__ void deepmad_sgd_buffer(
    float* buffer, const float* grad, const float* value, unsigned int n,
    float momentum, float weight_decay, int first) {
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += blockDim.x * gridDim.x) {
    float g = grad[i] + value[i] * weight_decay;
    buffer[i] = first ? g : buffer[i] * momentum + g;
  }
}

extern "C" __global__ void deepmad_sgd_value(
    float* value, const float* grad, const float* buffer, unsigned int n,
    float lr, float momentum, float weight_decay, int nesterov) {
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += blockDim.x * gridDim.x) {
    float g = grad[i] + value[i] * weight_decay;
    float update = momentum == 0.0f ? g : (nesterov ? g + buffer[i] * momentum : buffer[i]);
    value[i] = value[i] - update * lr;
  }
}

extern "C" __global__ void deepmad_running_mean(
    float* running, const float* mean, unsigned int n, float momentum) {
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += blockDim.x * gridDim.x) {
    running[i] = running[i] * (1.0f - momentum) + mean[i] * momentum;
  }
}

extern "C" __global__ void deepmad_running_var(
    float* running, const float* inv_std, unsigned int n, float momentum, float eps,
    float unbias) {
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += blockDim.x * gridDim.x) {
    float variance = 1.0f / (inv_std[i] * inv_std[i]) - eps;
    running[i] = running[i] * (1.0f - momentum) + variance * unbias * momentum;
  }
}

#define DEEPMAD_ELEMENTWISE(name, expression)                                      \
  extern "C" __global__ void name(float* out, const float* x, unsigned int n) {    \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;           \
         i += blockDim.x * gridDim.x) {                                            \
      float v = x[i];                                                              \
      out[i] = (expression);                                                       \
    }                                                                              \
  }
#define DEEPMAD_GRADIENT(name, expression)                                         \
  extern "C" __global__ void name(float* out, const float* x, const float* g,      \
                                  unsigned int n) {                                \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;           \
         i += blockDim.x * gridDim.x) {                                            \
      float v = x[i];                                                              \
      float d = g[i];                                                              \
      out[i] = (expression);                                                       \
    }                                                                              \
  }

// Depthwise convolution, NCHW input, (C, 1, K, K) filter, stride S, padding P. PyTorch also
// computes fp32 depthwise convolutions with its own kernels rather than cuDNN's.
extern "C" __global__ void deepmad_depthwise_forward(
    float* y, const float* x, const float* w, int N, int C, int H, int W, int Ho, int Wo,
    int K, int S, int P) {
  long long total = (long long)N * C * Ho * Wo;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)blockDim.x * gridDim.x) {
    int ox = (int)(i % Wo);
    int oy = (int)((i / Wo) % Ho);
    long long plane = i / ((long long)Wo * Ho);
    int c = (int)(plane % C);
    const float* xp = x + plane * H * W;
    const float* wp = w + (long long)c * K * K;
    float acc = 0.0f;
    for (int ky = 0; ky < K; ++ky) {
      int iy = oy * S - P + ky;
      if (iy < 0 || iy >= H) continue;
      for (int kx = 0; kx < K; ++kx) {
        int ix = ox * S - P + kx;
        if (ix < 0 || ix >= W) continue;
        acc += wp[ky * K + kx] * xp[iy * W + ix];
      }
    }
    y[i] = acc;
  }
}

extern "C" __global__ void deepmad_depthwise_backward_input(
    float* dx, const float* dy, const float* w, int N, int C, int H, int W, int Ho, int Wo,
    int K, int S, int P) {
  long long total = (long long)N * C * H * W;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)blockDim.x * gridDim.x) {
    int ix = (int)(i % W);
    int iy = (int)((i / W) % H);
    long long plane = i / ((long long)W * H);
    int c = (int)(plane % C);
    const float* gp = dy + plane * Ho * Wo;
    const float* wp = w + (long long)c * K * K;
    float acc = 0.0f;
    for (int ky = 0; ky < K; ++ky) {
      int ty = iy + P - ky;
      if (ty < 0 || ty % S != 0) continue;
      int oy = ty / S;
      if (oy >= Ho) continue;
      for (int kx = 0; kx < K; ++kx) {
        int tx = ix + P - kx;
        if (tx < 0 || tx % S != 0) continue;
        int ox = tx / S;
        if (ox >= Wo) continue;
        acc += wp[ky * K + kx] * gp[oy * Wo + ox];
      }
    }
    dx[i] = acc;
  }
}

// One block per (channel, tap): the sum over images and output pixels, reduced in shared
// memory. Launched with 256 threads per block.
extern "C" __global__ void deepmad_depthwise_backward_weight(
    float* dw, const float* dy, const float* x, int N, int C, int H, int W, int Ho, int Wo,
    int K, int S, int P) {
  __shared__ float partial[256];
  int c = blockIdx.x / (K * K);
  int tap = blockIdx.x % (K * K);
  int ky = tap / K, kx = tap % K;
  long long per_image = (long long)Ho * Wo;
  long long total = N * per_image;
  float acc = 0.0f;
  for (long long j = threadIdx.x; j < total; j += blockDim.x) {
    long long n = j / per_image;
    int rem = (int)(j % per_image);
    int oy = rem / Wo, ox = rem % Wo;
    int iy = oy * S - P + ky, ix = ox * S - P + kx;
    if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
    long long plane = n * C + c;
    acc += dy[plane * per_image + rem] * x[plane * H * W + iy * W + ix];
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int step = blockDim.x / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) partial[threadIdx.x] += partial[threadIdx.x + step];
    __syncthreads();
  }
  if (threadIdx.x == 0) dw[blockIdx.x] = partial[0];
}

// The fused convolution + BatchNorm op's tail (conv_bn/cudnn.rs): y = act(z + r), with act 0
// none, 1 ReLU, 2 ReLU6, 3 SiLU.
extern "C" __global__ void deepmad_add_act(
    float* y, const float* z, const float* r, unsigned int n, int act) {
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += blockDim.x * gridDim.x) {
    float v = z[i] + r[i];
    y[i] = act == 1 ? fmaxf(v, 0.0f)
         : act == 2 ? fminf(fmaxf(v, 0.0f), 6.0f)
         : act == 3 ? v / (1.0f + expf(-v))
         : v;
  }
}

// SiLU's input gradient where its input was z + r (the residual added before it).
extern "C" __global__ void deepmad_silu_backward_sum(
    float* out, const float* z, const float* r, const float* g, unsigned int n) {
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += blockDim.x * gridDim.x) {
    float v = z[i] + r[i];
    float s = 1.0f / (1.0f + expf(-v));
    out[i] = g[i] * s * (1.0f + v * (1.0f - s));
  }
}

DEEPMAD_ELEMENTWISE(deepmad_relu, fmaxf(v, 0.0f))
DEEPMAD_ELEMENTWISE(deepmad_relu6, fminf(fmaxf(v, 0.0f), 6.0f))
DEEPMAD_ELEMENTWISE(deepmad_silu, v / (1.0f + expf(-v)))
DEEPMAD_GRADIENT(deepmad_relu_backward, v > 0.0f ? d : 0.0f)
DEEPMAD_GRADIENT(deepmad_relu6_backward, (v > 0.0f && v < 6.0f) ? d : 0.0f)
DEEPMAD_GRADIENT(deepmad_silu_backward,
                 d * (1.0f / (1.0f + expf(-v))) * (1.0f + v * (1.0f - 1.0f / (1.0f + expf(-v)))))
"#;

/// Sets a freshly opened device up for training's allocation pattern: every op allocates its
/// output and frees it a moment later, thousands of times a step. Measured on an H200 (see
/// `docs/performance.md`), the host, not the GPU, bounded ResNet-20's step at batch 128.
/// - cudarc creates two CUDA events with every allocation (and destroys them with it), to order
///   uses across streams. candle runs each thread's work on one stream (CUDA's per-thread
///   default stream) and cudarc waits on those events only once a second stream exists in the
///   context, which deepmad never creates; so they are never used, and not made.
/// - The stream-ordered allocator's default pool returns all its free memory to the driver at
///   every synchronisation (its release threshold is 0), so each step mapped its activations
///   afresh. The threshold is raised to keep freed memory in the pool, as PyTorch's caching
///   allocator does; the process's GPU memory then stays at its peak.
pub fn prepare_device(device: &CudaDevice) -> candle_core::Result<()> {
    let cuda_error = |error: cudarc::driver::DriverError| candle_core::Error::Cuda(Box::new(error));
    // SAFETY: no slice of this device exists yet, and none of its streams but candle's is ever
    // made (see above), so no allocation needs events to be ordered.
    unsafe { device.disable_event_tracking() };
    let stream = device.cuda_stream();
    let context = stream.context();
    if !context.has_async_alloc() {
        return Ok(());
    }
    use cudarc::driver::{result, sys};
    let mut threshold = u64::MAX;
    // SAFETY: the device is the context's own; the release threshold is a u64 attribute.
    unsafe {
        let pool = result::device::get_default_mem_pool(context.cu_device()).map_err(cuda_error)?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(cuda_error)?;
    }
    Ok(())
}

/// The PTX of [`SOURCE`], compiled on first use.
fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|ptx| ptx.to_src())
            .map_err(|error| format!("compiling deepmad's CUDA kernels with NVRTC: {error:?}"))
    })
    .as_deref()
    .map_err(|error| candle_core::Error::Cuda(error.clone().into()))
}

/// The f32 elements of a contiguous tensor's storage.
pub(crate) fn f32_view<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, f32>> {
    if storage.dtype() != DType::F32 {
        candle_core::bail!("{what}: only f32 is supported, got {:?}", storage.dtype());
    }
    let (start, end) =
        layout
            .contiguous_offsets()
            .ok_or(candle_core::Error::RequiresContiguous {
                op: "deepmad-kernel",
            })?;
    Ok(storage.as_cuda_slice::<f32>()?.slice(start..end))
}

/// The f32 elements of a contiguous tensor's storage, to write.
pub(crate) fn f32_view_mut<'a>(
    storage: &'a mut CudaStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<CudaViewMut<'a, f32>> {
    if storage.dtype() != DType::F32 {
        candle_core::bail!("{what}: only f32 is supported, got {:?}", storage.dtype());
    }
    let (start, end) =
        layout
            .contiguous_offsets()
            .ok_or(candle_core::Error::RequiresContiguous {
                op: "deepmad-kernel",
            })?;
    Ok(storage.as_cuda_slice_mut::<f32>()?.slice_mut(start..end))
}

/// One argument of a kernel launch.
pub(crate) enum Arg<'a, 'b> {
    Out(&'b mut CudaViewMut<'a, f32>),
    In(&'b CudaView<'a, f32>),
    U32(u32),
    F32(f32),
    I32(i32),
}

/// Launches kernel `name` over `n` elements (one thread each, grid-stride) with `args`.
pub(crate) fn launch(
    device: &CudaDevice,
    name: &str,
    n: usize,
    args: &mut [Arg<'_, '_>],
) -> candle_core::Result<()> {
    let n = u32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("{name}: {n} elements is too many")))?;
    if n == 0 {
        return Ok(());
    }
    launch_with(device, name, LaunchConfig::for_num_elems(n), args)
}

/// Launches kernel `name` with an explicit grid (kernels with block-level reductions).
pub(crate) fn launch_with(
    device: &CudaDevice,
    name: &str,
    config: LaunchConfig,
    args: &mut [Arg<'_, '_>],
) -> candle_core::Result<()> {
    let function = device.get_or_load_custom_func(name, MODULE, ptx()?)?;
    let mut builder = function.builder();
    for arg in args.iter_mut() {
        match arg {
            Arg::Out(view) => builder.arg(&mut **view),
            Arg::In(view) => builder.arg(&**view),
            Arg::U32(value) => builder.arg(&*value),
            Arg::F32(value) => builder.arg(&*value),
            Arg::I32(value) => builder.arg(&*value),
        };
    }
    // SAFETY: every kernel in SOURCE takes exactly the arguments its caller passes, in order
    // (device pointers sized for the shapes passed after them, then scalars), and guards every
    // index it computes with those shapes.
    unsafe { builder.launch(config) }
        .map(|_| ())
        .map_err(|error| candle_core::Error::Cuda(Box::new(error)))
}
