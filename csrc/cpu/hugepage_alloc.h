// Large output buffers: backed by transparent huge pages and recycled.
//
// A fresh N*V gradient is first touched inside the kernel, and on these
// machines that first touch costs more than the kernel's own work (see
// shared/PERF_NOTES.md; after other large frees we measured a 512 MiB
// gradient's faults at 3-10x the kernel's time). glibc returns large blocks
// to the kernel on every free, so each call would pay again. Two remedies:
//   * blocks are 2 MiB-aligned and advised MADV_HUGEPAGE (THP runs in
//     `madvise` mode here), so a first touch faults 2 MiB at a time;
//   * freed blocks are kept and handed to the next request of the same size,
//     so a training loop's per-step gradient, or an inference loop's
//     activations, reuse already-faulted memory. The shared cache (get())
//     keeps only the newest idle block; the activations cache of the
//     block-sparse layers (activations()) keeps every idle block up to
//     kActivationBytes in all (a network's outputs come in a few sizes that
//     alternate, so one block would fault on most calls).
//     pycompress.empty_cache() returns both.
// Small tensors use the ordinary allocator.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pycompress {

class BlockCache {
 public:
  // Keeps the newest idle block, and older ones while all idle blocks fit in max_idle_bytes.
  explicit BlockCache(size_t max_idle_bytes) : max_idle_bytes_(max_idle_bytes) {}
  static BlockCache& get() {
    static BlockCache cache(0);
    return cache;
  }
  static constexpr size_t kActivationBytes = size_t(256) << 20;
  static BlockCache& activations() {
    static BlockCache cache(kActivationBytes);
    return cache;
  }
  // A cached block of exactly `bytes`, or nullptr (the one-block cache then drops its block).
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (blocks_[i].second != bytes) continue;
      void* out = blocks_[i].first;
      idle_bytes_ -= bytes;
      blocks_.erase(blocks_.begin() + i);
      return out;
    }
    if (max_idle_bytes_ == 0) free_all();
    return nullptr;
  }
  void give_back(void* ptr, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    blocks_.insert(blocks_.begin(), {ptr, bytes});  // newest first
    idle_bytes_ += bytes;
    while (blocks_.size() > 1 && idle_bytes_ > max_idle_bytes_) {  // drop the oldest
      idle_bytes_ -= blocks_.back().second;
      std::free(blocks_.back().first);
      blocks_.pop_back();
    }
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    free_all();
  }

 private:
  void free_all() {
    for (auto& b : blocks_) std::free(b.first);
    blocks_.clear();
    idle_bytes_ = 0;
  }

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;
  size_t idle_bytes_ = 0;
  const size_t max_idle_bytes_;
};

inline at::Tensor empty_hugepage(at::IntArrayRef sizes, const at::TensorOptions& options,
                                 BlockCache& cache = BlockCache::get()) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < 2 * kHuge || options.device().type() != at::kCPU) return at::empty(sizes, options);
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* ptr = cache.take(rounded);
  if (ptr == nullptr) {
    ptr = std::aligned_alloc(kHuge, rounded);
    TORCH_CHECK(ptr != nullptr, "pycompress: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, rounded, MADV_HUGEPAGE);  // advisory: failure only costs speed
#endif
  }
  return at::from_blob(ptr, sizes, [rounded, &cache](void* p) { cache.give_back(p, rounded); }, options);
}

}  // namespace pycompress
