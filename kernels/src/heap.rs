//! The process heap's policy for training's allocation pattern. Call
//! [`keep_freed_memory`] first thing in `main`, before other threads start.

/// Training frees and reallocates the same activation-sized buffers (megabytes) every step.
/// glibc serves large blocks with fresh `mmap`s and unmaps them on free, so each step faulted in
/// zeroed pages again. On the 2-core development machine ResNet-20 training ran at 105-110
/// images/s at batch 128 with glibc's defaults, and at 156-168 with the heap keeping them; at
/// batch 512, whose buffers exceed glibc's largest mmap threshold (32 MiB), it ran at 99 images/s
/// until mmap was turned off for allocations altogether, and then at 175. Here: no
/// allocation is served by its own mmap (the heap grows instead, and freed blocks are reused),
/// and the heap's top is never trimmed. Memory is kept at its peak, as GPU frameworks' caching
/// allocators do.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() {
    // SAFETY: mallopt takes integer arguments and only sets allocator parameters (glibc takes
    // its arena lock for it; a rejected value leaves the default, which is only slower).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Elsewhere the allocator's defaults stay.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() {}
