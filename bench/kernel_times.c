// GPU time per kernel, for machines without Nsight: a CUDA injection library that records every
// kernel, memset and memcopy through CUPTI's activity API and, at exit, prints the total device
// time, the count and the mean per kernel name, heaviest first. It sees every kernel of the
// process (cuDNN's and cuBLAS's too), for any program: deepmad and PyTorch alike.
// Build: bench/make_profilers.sh (CUPTI's headers and library come from PyPI).
// Use: CUDA_INJECTION64_PATH=$PWD/kernel_times.so [KERNEL_TIMES_OUT=file] program ...
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 8192
struct entry { const char *name; uint64_t count, nanos; };
static struct entry table[SLOTS];
static uint64_t memset_n, memset_ns, memcpy_n, memcpy_ns, kernel_ns, first_start, last_end;

static void add(const char *name, uint64_t nanos) {
  // CUPTI shares one name string between all records of a kernel: its address is the key.
  uint64_t h = ((uint64_t)(uintptr_t)name >> 4) % SLOTS;
  for (int probe = 0; probe < SLOTS; probe++, h = (h + 1) % SLOTS) {
    if (table[h].name == name || table[h].name == NULL) {
      table[h].name = name;
      table[h].count += 1;
      table[h].nanos += nanos;
      return;
    }
  }
}

static void span(uint64_t start, uint64_t end) {
  if (first_start == 0 || start < first_start) first_start = start;
  if (end > last_end) last_end = end;
}

static void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *records) {
  *size = 16 << 20;
  *buffer = aligned_alloc(8, *size);
  *records = 0;
}

static void CUPTIAPI completed(CUcontext context, uint32_t stream, uint8_t *buffer, size_t size,
                               size_t valid) {
  (void)context; (void)stream; (void)size;
  CUpti_Activity *record = NULL;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL ||
        record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)record;
      add(k->name, k->end - k->start);
      kernel_ns += k->end - k->start;
      span(k->start, k->end);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)record;
      memset_n += 1; memset_ns += m->end - m->start;
      span(m->start, m->end);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)record;
      memcpy_n += 1; memcpy_ns += m->end - m->start;
      span(m->start, m->end);
    }
  }
  free(buffer);
}

static int by_time(const void *a, const void *b) {
  const struct entry *x = a, *y = b;
  return x->nanos < y->nanos ? 1 : x->nanos > y->nanos ? -1 : 0;
}

static void report(void) {
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  const char *path = getenv("KERNEL_TIMES_OUT");
  FILE *out = path ? fopen(path, "w") : stderr;
  if (!out) out = stderr;
  qsort(table, SLOTS, sizeof table[0], by_time);
  fprintf(out, "kernels %.3f ms, memsets %llu in %.3f ms, memcopies %llu in %.3f ms; "
          "first start to last end %.3f ms\n",
          kernel_ns / 1e6, (unsigned long long)memset_n, memset_ns / 1e6,
          (unsigned long long)memcpy_n, memcpy_ns / 1e6, (last_end - first_start) / 1e6);
  fprintf(out, "%10s %10s %9s  %s\n", "total ms", "count", "mean us", "kernel");
  for (int i = 0; i < SLOTS && table[i].name; i++) {
    fprintf(out, "%10.3f %10llu %9.2f  %.160s\n", table[i].nanos / 1e6,
            (unsigned long long)table[i].count, table[i].nanos / 1e3 / table[i].count,
            table[i].name);
  }
  if (out != stderr) fclose(out);
}

// Called by the CUDA driver when it loads this library (CUDA_INJECTION64_PATH).
int InitializeInjection(void) {
  cuptiActivityRegisterCallbacks(requested, completed);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  atexit(report);
  return 1;
}
