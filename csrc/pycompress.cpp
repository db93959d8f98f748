// The pycompress op namespace. Each op family declares its schemas in its own
// csrc/<family>.cpp with TORCH_LIBRARY_FRAGMENT; this file owns the namespace
// itself (TORCH_LIBRARY may appear once per namespace) and build facts that
// tests and benchmarks report.
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu/bf16_dot.h"
#include "cpu/hugepage_alloc.h"

namespace pycompress {

// Width in bits of at::vec::Vectorized<float> as compiled into this library:
// 512 with AVX-512, 256 with AVX2, otherwise the scalar fallback's width.
// Benchmarks print it so a build that silently lost its vector ISA shows.
int64_t cpu_vector_bits() {
  return static_cast<int64_t>(at::vec::Vectorized<float>::size()) * 32;
}

// Whether bf16 1x1 block-sparse convs multiply with AVX512-BF16 dot products
// (weights rounded to bf16) rather than in fp32.
bool cpu_bf16_dot() {
#ifdef PYCOMPRESS_BF16_DOT
  return true;
#else
  return false;
#endif
}

// Frees the idle output block that large CPU outputs are recycled through.
void empty_cache() {
  BlockCache::get().clear();
  BlockCache::activations().clear();
}

TORCH_LIBRARY(pycompress, m) {
  m.def("_cpu_vector_bits() -> int", &cpu_vector_bits);
  m.def("_cpu_bf16_dot() -> bool", &cpu_bf16_dot);
  m.def("_empty_cache() -> ()", &empty_cache);
}

}  // namespace pycompress
