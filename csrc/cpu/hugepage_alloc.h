// Large output buffers: backed by transparent huge pages and recycled.
//
// A fresh N*V gradient is first touched inside the kernel, and on these
// machines that first touch costs more than the kernel's own work (see
// shared/PERF_NOTES.md; after other large frees we measured a 512 MiB
// gradient's faults at 3-10x the kernel's time). glibc returns large blocks
// to the kernel on every free, so each call would pay again. Two remedies:
//   * blocks are 2 MiB-aligned and advised MADV_HUGEPAGE (THP runs in
//     `madvise` mode here), so a first touch faults 2 MiB at a time;
//   * the most recently freed block is kept (one block, process-wide) and
//     handed to the next request of the same size: a training loop's
//     per-step gradient then reuses already-faulted memory. At most one idle
//     block is held; pycompress.empty_cache() returns it.
// Small tensors use the ordinary allocator.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pycompress {

class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache cache;
    return cache;
  }
  // A cached block of exactly `bytes`, or nullptr (dropping a cached block of another size).
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    void* out = nullptr;
    if (ptr_ != nullptr && bytes_ == bytes) out = ptr_;
    else std::free(ptr_);
    ptr_ = nullptr;
    return out;
  }
  void give_back(void* ptr, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::free(ptr_);  // keep only the newest block
    ptr_ = ptr;
    bytes_ = bytes;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::free(ptr_);
    ptr_ = nullptr;
  }

 private:
  std::mutex mutex_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

inline at::Tensor empty_hugepage(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < 2 * kHuge || options.device().type() != at::kCPU) return at::empty(sizes, options);
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* ptr = BlockCache::get().take(rounded);
  if (ptr == nullptr) {
    ptr = std::aligned_alloc(kHuge, rounded);
    TORCH_CHECK(ptr != nullptr, "pycompress: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, rounded, MADV_HUGEPAGE);  // advisory: failure only costs speed
#endif
  }
  return at::from_blob(ptr, sizes, [rounded](void* p) { BlockCache::get().give_back(p, rounded); }, options);
}

}  // namespace pycompress
