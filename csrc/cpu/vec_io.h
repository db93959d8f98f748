// Loads and stores of at::vec lanes in the compute type, shared by the CPU loss kernels.
// VecIo<scalar_t>::acc_t is the type a kernel computes in: fp32 and fp64 as they are,
// bf16 and fp16 widened to fp32. A count n < Vec::size() loads or stores a tail.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

namespace pycompress {

template <typename scalar_t>
struct VecIo {  // fp32 and fp64: no conversion
  using acc_t = scalar_t;
  using Vec = at::vec::Vectorized<acc_t>;
  static Vec load(const scalar_t* p, int64_t n) { return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n); }
  static void store(scalar_t* p, const Vec& v, int64_t n) { n == Vec::size() ? v.store(p) : v.store(p, n); }
};

template <typename reduced_t>
struct ReducedVecIo {  // bf16 and fp16: computed in fp32
  using acc_t = float;
  using Vec = at::vec::Vectorized<float>;
  static Vec load(const reduced_t* p, int64_t n) {
    Vec out;
    if (n == Vec::size()) {
      at::vec::load_to_float<reduced_t>(p, out);
    } else {
      reduced_t buf[Vec::size()] = {};
      std::copy(p, p + n, buf);
      at::vec::load_to_float<reduced_t>(buf, out);
    }
    return out;
  }
  static void store(reduced_t* p, const Vec& v, int64_t n) {
    at::vec::convert_from_float<reduced_t>(v, v).store(p, n);
  }
};
template <>
struct VecIo<at::BFloat16> : ReducedVecIo<at::BFloat16> {};
template <>
struct VecIo<at::Half> : ReducedVecIo<at::Half> {};

}  // namespace pycompress
