// Counts and times the CUDA driver calls a process makes directly (candle and cudarc link the
// driver library; cuDNN and cuBLAS reach it through the runtime, which this does not see), for
// finding where a host-bound training step spends its time when no profiler is installed.
// Build:  gcc -O2 -shared -fPIC -o driver_calls.so bench/driver_calls.c -ldl
// Use:    LD_PRELOAD=./driver_calls.so deepmad bench ... ; at exit it prints, to stderr, each
//         wrapped function's calls and total microseconds, and the wall time since it loaded.
// Every wrapped function takes at most 11 integer or pointer arguments (none takes a float or
// a struct by value), so one wrapper shape forwards them all unchanged.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

typedef uint64_t u64;
typedef int (*driver_fn)(u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64);

#define FUNCTIONS(X) \
  X(cuLaunchKernel) X(cuLaunchKernelEx) X(cuMemAllocAsync) X(cuMemFreeAsync) X(cuMemAlloc_v2) \
  X(cuMemFree_v2) X(cuEventCreate) X(cuEventDestroy_v2) X(cuEventRecord) X(cuStreamWaitEvent) \
  X(cuCtxGetCurrent) X(cuCtxSetCurrent) X(cuModuleGetFunction) X(cuMemsetD8Async) \
  X(cuMemsetD32Async) X(cuMemcpyHtoDAsync_v2) X(cuMemcpyDtoHAsync_v2) X(cuMemcpyDtoDAsync_v2) \
  X(cuStreamSynchronize) X(cuCtxSynchronize) X(cuMemcpyHtoD_v2) X(cuMemcpyDtoH_v2) \
  X(cuPointerGetAttribute) X(cuFuncGetAttribute) X(cuDeviceGetAttribute) X(cuEventQuery) \
  X(cuEventSynchronize) X(cuStreamQuery) X(cuMemAllocFromPoolAsync) X(cuCtxPushCurrent_v2) \
  X(cuCtxPopCurrent_v2) X(cuModuleLoadData) X(cuFuncSetAttribute) X(cuMemHostAlloc) \
  X(cuMemFreeHost)

#define ENUM(name) ID_##name,
enum { FUNCTIONS(ENUM) COUNT };
#define NAME(name) #name,
static const char *names[COUNT] = {FUNCTIONS(NAME)};
static u64 calls[COUNT], nanos[COUNT];
static struct timespec loaded;

static u64 now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (u64)t.tv_sec * 1000000000u + (u64)t.tv_nsec;
}

#define WRAP(name)                                                                       \
  int name(u64 a, u64 b, u64 c, u64 d, u64 e, u64 f, u64 g, u64 h, u64 i, u64 j, u64 k) { \
    static driver_fn real;                                                               \
    if (!real) real = (driver_fn)dlsym(RTLD_NEXT, #name);                                \
    if (!real) return 500; /* CUDA_ERROR_NOT_FOUND */                                    \
    u64 start = now();                                                                   \
    int status = real(a, b, c, d, e, f, g, h, i, j, k);                                  \
    nanos[ID_##name] += now() - start;                                                   \
    calls[ID_##name] += 1;                                                               \
    return status;                                                                       \
  }
FUNCTIONS(WRAP)

__attribute__((constructor)) static void start(void) { clock_gettime(CLOCK_MONOTONIC, &loaded); }

__attribute__((destructor)) static void report(void) {
  u64 wall = now() - ((u64)loaded.tv_sec * 1000000000u + (u64)loaded.tv_nsec);
  u64 total = 0;
  fprintf(stderr, "driver calls (function, calls, total us, us per call):\n");
  for (int n = 0; n < COUNT; n++) {
    if (!calls[n]) continue;
    total += nanos[n];
    fprintf(stderr, "  %-26s %10llu %12.0f %8.2f\n", names[n], (unsigned long long)calls[n],
            nanos[n] / 1e3, nanos[n] / 1e3 / calls[n]);
  }
  fprintf(stderr, "in these calls: %.0f us of %.0f us since load\n", total / 1e3, wall / 1e3);
}
