// Box and neighbourhood math shared by the NMS kernels: csrc/cpu/nms_kernel.cpp
// (scalar and at::vec lanes) and csrc/cuda/nms_kernel.cu (device code).
//
// Exactness contract (torchvision's CPU nms, which users compare to the index):
//   area  = (x2 - x1) * (y2 - y1)                        (negative for inverted boxes)
//   w     = max(0, min(ix2, jx2) - max(ix1, jx1)), h likewise, inter = w * h
//   iou   = inter / ((area_i + area_j) - inter)          (0/0 = NaN: never suppresses)
//   j is suppressed by the kept box i iff iou > iou_threshold (strictly).
// Every step is one IEEE-rounded op in the compute type (float for fp32/fp16/bf16
// boxes, double for fp64), in exactly this order: no FMA contraction (device code
// uses the __f*_rn intrinsics, which nvcc never fuses), and max/min are std::max /
// std::min, whose NaN and signed-zero behaviour (return the first argument unless
// the comparison holds) differs from fmax/fmin. The formula is written once, over
// an Ops policy, so the scalar, vector and device versions cannot drift apart.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define PYC_HD __host__ __device__ __forceinline__
#else
#define PYC_HD inline
#endif

namespace pycompress {
namespace nms_math {

#ifdef __CUDACC__
// Round-to-nearest arithmetic that nvcc never contracts into FMAs.
__device__ __forceinline__ float rn_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rn_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float rn_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float rn_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double rn_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double rn_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double rn_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double rn_div(double a, double b) { return __ddiv_rn(a, b); }
#endif

// Scalar operations with the reference semantics, host and device.
template <typename T>
struct ScalarOps {
  using V = T;
  static PYC_HD V splat(T x) { return x; }
  static PYC_HD V max(V a, V b) { return a < b ? b : a; }  // std::max(a, b)
  static PYC_HD V min(V a, V b) { return b < a ? b : a; }  // std::min(a, b)
#ifdef __CUDA_ARCH__
  static PYC_HD V add(V a, V b) { return rn_add(a, b); }
  static PYC_HD V sub(V a, V b) { return rn_sub(a, b); }
  static PYC_HD V mul(V a, V b) { return rn_mul(a, b); }
  static PYC_HD V div(V a, V b) { return rn_div(a, b); }
#else
  static PYC_HD V add(V a, V b) { return a + b; }
  static PYC_HD V sub(V a, V b) { return a - b; }
  static PYC_HD V mul(V a, V b) { return a * b; }
  static PYC_HD V div(V a, V b) { return a / b; }
#endif
};

template <class Ops>
PYC_HD typename Ops::V box_area(typename Ops::V x1, typename Ops::V y1, typename Ops::V x2, typename Ops::V y2) {
  return Ops::mul(Ops::sub(x2, x1), Ops::sub(y2, y1));
}

// Intersection of the kept box i with candidate(s) j; the argument order of
// max/min matters for NaN coordinates (i first, as in torchvision's loop).
template <class Ops>
PYC_HD typename Ops::V box_inter(typename Ops::V ix1, typename Ops::V iy1, typename Ops::V ix2,
                                 typename Ops::V iy2, typename Ops::V jx1, typename Ops::V jy1,
                                 typename Ops::V jx2, typename Ops::V jy2) {
  using V = typename Ops::V;
  const V zero = Ops::splat(0);
  const V w = Ops::max(zero, Ops::sub(Ops::min(ix2, jx2), Ops::max(ix1, jx1)));
  const V h = Ops::max(zero, Ops::sub(Ops::min(iy2, jy2), Ops::max(iy1, jy1)));
  return Ops::mul(w, h);
}

// Host compilers contract a*b+c only when a product feeds nothing but adds
// (GCC) or within one expression (clang); inter also feeds the division and
// each op is its own expression, and tests/test_nms.py checks the built CPU
// code for FMA instructions.
template <class Ops>
PYC_HD typename Ops::V box_iou_from_inter(typename Ops::V inter, typename Ops::V area_i, typename Ops::V area_j) {
  return Ops::div(inter, Ops::sub(Ops::add(area_i, area_j), inter));
}

// The float threshold t with (float iou > t) <=> ((double)iou > thr) for every
// float iou, NaN included: torchvision compares its float IoU with the double
// threshold. t is the largest float <= thr (rounding to nearest may overshoot,
// then one ulp toward -inf fixes it; -0 steps to -denorm_min). Host only.
inline float float_threshold(double thr) {
  float t = static_cast<float>(thr);
  if (static_cast<double>(t) > thr) {
    uint32_t bits;
    std::memcpy(&bits, &t, sizeof bits);
    bits = t > 0.0f ? bits - 1 : bits + 1;
    std::memcpy(&t, &bits, sizeof bits);
  }
  return t;
}

// FM-NMS: candidates at cells (hi, wi) and (hj, wj) are neighbours for a K x K
// window when their Chebyshev distance is at most radius = K / 2.
PYC_HD bool in_window(int64_t hi, int64_t wi, int64_t hj, int64_t wj, int64_t radius) {
  const int64_t dh = hi > hj ? hi - hj : hj - hi;
  const int64_t dw = wi > wj ? wi - wj : wj - wi;
  return dh <= radius && dw <= radius;
}

// Bitmask NMS (CUDA): boxes in tiles of 64, one 64-bit overlap word per box and tile.
constexpr int kTileBoxes = 64;
PYC_HD int64_t num_tiles(int64_t n) { return (n + kTileBoxes - 1) / kTileBoxes; }

}  // namespace nms_math
}  // namespace pycompress
