// Output buffers backed by transparent huge pages.
//
// A fresh N*V gradient is first touched inside the kernel; with 4 KiB pages
// that first touch costs more than the kernel's own work (see
// shared/PERF_NOTES.md: 0.05 s vs 0.017 s per 512 MiB). THP runs in `madvise`
// mode on our machines, so large outputs are allocated 2 MiB-aligned and
// advised MADV_HUGEPAGE: the kernel then faults 2 MiB at a time. Small
// tensors use the ordinary allocator.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pycompress {

inline at::Tensor empty_hugepage(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHuge = size_t(2) << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes < 2 * kHuge || options.device().type() != at::kCPU) return at::empty(sizes, options);
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* ptr = std::aligned_alloc(kHuge, rounded);
  TORCH_CHECK(ptr != nullptr, "pycompress: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(ptr, rounded, MADV_HUGEPAGE);  // advisory: failure only costs speed
#endif
  return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options);
}

}  // namespace pycompress
