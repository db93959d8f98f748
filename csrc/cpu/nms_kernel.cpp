// Greedy NMS, per-category batched NMS and FM-NMS, CPU kernels.
//
// nms / batched_nms (torchvision's results to the index; formulas in nms_math.h):
//   1. order: a stable LSD radix sort of the scores on an order-preserving
//      integer key (descending, NaN first, -0 == +0, ties by lower index):
//      the order of torch.sort(descending=True, stable=True), in O(N).
//   2. per category (one category for nms): gather the boxes in score order
//      into struct-of-arrays x1, y1, x2, y2, area, id (compute type: float for
//      fp32/fp16/bf16, double for fp64).
//   3. sweep: the first alive candidate is kept; the IoU of it against every
//      alive candidate after it is computed a vector at a time (at::vec lanes,
//      AVX-512 here) and the suppressed ones lose their alive bit. A multiply
//      and compare prove most lanes unsuppressed, so the exact division runs
//      only where suppression is possible; dead candidates are compacted away
//      once they are a quarter of the span. The work is thus the sum over kept
//      boxes of the candidates still alive, and shrinks as boxes die, where
//      torchvision's loop visits all later boxes for every kept box.
//      One thread: a sweep is a few microseconds, too short to split.
//   4. batched_nms: categories run concurrently (largest first, dynamic
//      scheduling) when there is enough work; the kept flags are then read
//      back in the global score order, which is torchvision's output order.
//      No coordinate offset is involved, so huge coordinates stay exact.
// fm_nms (Mehta & Ozturk 2018; shared/METHODS.md section 3), images in parallel:
//   per image, class argmax per candidate, a radix sort of the objectness
//   (descending, NaN last, ties by lower flat index a*H*W + h*W + w), then one greedy
//   pass: a candidate is kept unless its cell is blocked for its class, and a
//   kept candidate blocks the K x K cells around it for its class (all anchors).
//   Linear: O(A*C*H*W) for the argmax, O(A*H*W) for the sort and the pass,
//   plus O(kept * K^2) bytes marked.
// Memory traffic: nms reads boxes and scores once and keeps O(N) scratch (six
// arrays of N in the compute type, which sit in L2 up to ~50k boxes); fm_nms
// reads class_probs and objectness once and writes a bool per candidate.
// Numerics: see nms_math.h; the sort keys and the argmax are exact comparisons.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "nms_math.h"

namespace pycompress {
namespace {

using at::vec::Vectorized;
namespace nm = nms_math;

// ---------------------------------------------------------------------------
// Sorting: integer keys whose ascending order is torch.sort(descending=True)'s.

inline uint32_t desc_key(float f) {
  if (std::isnan(f)) return 0;  // torch sorts NaN as the largest value
  if (f == 0.0f) f = 0.0f;      // -0 == +0: a tie, resolved by index
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending in value
  return ~u;
}

inline uint64_t desc_key(double f) {
  if (std::isnan(f)) return 0;
  if (f == 0.0) f = 0.0;
  uint64_t u;
  std::memcpy(&u, &f, sizeof u);
  u = (u >> 63) ? ~u : (u | (uint64_t(1) << 63));
  return ~u;
}

// Stable LSD radix sort of key[0..n) by bytes; writes the permutation to order.
// Passes whose byte is the same for every key are skipped (scores in [0, 1]
// share their top bits), so float scores usually take 2-3 passes.
template <typename K>
void radix_argsort(const K* key, int64_t n, int32_t* order, std::vector<K>& kbuf, std::vector<int32_t>& ibuf) {
  constexpr int kPasses = sizeof(K);
  std::array<std::array<int32_t, 256>, kPasses> hist{};
  for (int64_t i = 0; i < n; ++i) {
    for (int p = 0; p < kPasses; ++p) ++hist[p][(key[i] >> (8 * p)) & 0xff];
  }
  kbuf.resize(2 * n);
  ibuf.resize(2 * n);
  K* ksrc = kbuf.data();
  K* kdst = ksrc + n;
  int32_t* isrc = ibuf.data();
  int32_t* idst = isrc + n;
  std::copy(key, key + n, ksrc);
  std::iota(isrc, isrc + n, 0);
  for (int p = 0; p < kPasses; ++p) {
    auto& h = hist[p];
    if (n == 0 || h[(ksrc[0] >> (8 * p)) & 0xff] == n) continue;
    int32_t sum = 0;
    for (auto& c : h) {
      const int32_t t = c;
      c = sum;
      sum += t;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int32_t pos = h[(ksrc[i] >> (8 * p)) & 0xff]++;
      kdst[pos] = ksrc[i];
      idst[pos] = isrc[i];
    }
    std::swap(ksrc, kdst);
    std::swap(isrc, idst);
  }
  std::copy(isrc, isrc + n, order);
}

// ---------------------------------------------------------------------------
// Vector lanes with the reference semantics (see nms_math.h).

template <typename T>
struct VecOps {
  using V = Vectorized<T>;
  static V splat(T x) { return V(x); }
  // std::max(a, b) = a < b ? b : a. x86 max(x, y) returns y unless x > y
  // (also for NaN and for +-0), so max(b, a) is exactly std::max(a, b).
  static V max(const V& a, const V& b) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) return _mm512_max_ps(b, a); else return _mm512_max_pd(b, a);
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) return _mm256_max_ps(b, a); else return _mm256_max_pd(b, a);
#else
    return V::blendv(a, b, a < b);
#endif
  }
  // std::min(a, b) = b < a ? b : a = x86 min(b, a).
  static V min(const V& a, const V& b) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) return _mm512_min_ps(b, a); else return _mm512_min_pd(b, a);
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) return _mm256_min_ps(b, a); else return _mm256_min_pd(b, a);
#else
    return V::blendv(a, b, b < a);
#endif
  }
  static V add(const V& a, const V& b) { return a + b; }
  static V sub(const V& a, const V& b) { return a - b; }
  static V mul(const V& a, const V& b) { return a * b; }
  static V div(const V& a, const V& b) { return a / b; }
};

// Bits of the lanes where `a OP b` holds (ordered compares: false for NaN).
enum class Cmp { GT, GE, LE };
template <Cmp op, typename T>
inline uint32_t cmp_bits(const Vectorized<T>& a, const Vectorized<T>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int pred = op == Cmp::GT ? _CMP_GT_OQ : op == Cmp::GE ? _CMP_GE_OQ : _CMP_LE_OQ;
  if constexpr (std::is_same_v<T, float>) return _mm512_cmp_ps_mask(a, b, pred);
  else return _mm512_cmp_pd_mask(a, b, pred);
#else
  constexpr uint32_t all = (1u << Vectorized<T>::size()) - 1;
  const Vectorized<T> m = op == Cmp::GT ? (a > b) : op == Cmp::GE ? (a >= b) : (a <= b);
  return ~static_cast<uint32_t>(m.zero_mask()) & all;
#endif
}

// Remaining candidates in score order, struct of arrays, padded by one vector
// so that full-width loads past the end stay in bounds.
template <typename T>
struct Candidates {
  std::vector<T> x1, y1, x2, y2, area;
  std::vector<int32_t> id;
  void resize(int64_t n) {
    const int64_t padded = n + Vectorized<T>::size();
    for (auto* v : {&x1, &y1, &x2, &y2, &area}) v->resize(padded);
    id.resize(padded);
  }
};

// Threshold constants of the sweep. `iou > thr` is the exact test. For
// thr = 0 or thr >= 2^-30 (2^-400 for double) a cheaper test proves most lanes
// unsuppressed without dividing: if union >= tiny and inter <= fl(union * lo),
// lo = thr * (1 - 2^-20), then inter < union * thr exactly (the product's
// relative rounding error, at most 2^-24, cannot close a 2^-20 gap and is not
// subnormal), so the correctly rounded inter / union is <= thr. A lane where
// any value is NaN, inf, or union is tiny or negative fails the test and takes
// the division; so does every lane when the threshold is negative.
template <typename T>
struct SweepThreshold {
  T thr, lo, tiny;
  bool filter;
  explicit SweepThreshold(double iou_threshold) {
    constexpr bool f32 = std::is_same_v<T, float>;
    thr = f32 ? static_cast<T>(nm::float_threshold(iou_threshold)) : static_cast<T>(iou_threshold);
    const T min_thr = f32 ? T(0x1p-30) : T(0x1p-400);
    filter = thr == T(0) || thr >= min_thr;
    lo = thr * (T(1) - T(0x1p-20));
    tiny = f32 ? T(0x1p-60) : T(0x1p-500);
  }
};

// Greedy NMS over c[0..m) (already in score order): appends the kept ids, in
// order, to `kept`. The first alive candidate is kept and every alive candidate
// it suppresses loses its alive bit; the arrays are compacted (survivors moved
// to the front, order kept) once a quarter of the remaining span is dead, so
// later sweeps skip dead candidates without a store per vector.
template <typename T>
void greedy_sweep(Candidates<T>& c, int64_t m, const SweepThreshold<T>& th, std::vector<int32_t>& kept) {
  using Vec = Vectorized<T>;
  using Ops = VecOps<T>;
  constexpr int64_t W = Vec::size();
  const Vec vthr(th.thr), vlo(th.lo), vtiny(th.tiny);
  std::vector<uint32_t> alive((m + W - 1) / W + 1);
  auto reset_alive = [&](int64_t count) {  // positions [0, count) alive
    std::fill(alive.begin(), alive.end(), 0u);
    for (int64_t k = 0; k < count / W; ++k) alive[k] = (W == 32 ? 0u : 1u << W) - 1;
    if (count % W) alive[count / W] = (1u << (count % W)) - 1;
  };
  reset_alive(m);
  int64_t head = 0, dead = 0;
  const int64_t words = static_cast<int64_t>(alive.size());
  while (true) {
    int64_t k = head / W;  // the next alive candidate is the next kept box
    uint32_t bits = k < words ? alive[k] & (~0u << (head % W)) : 0;
    while (bits == 0 && ++k < words) bits = alive[k];
    if (bits == 0) break;
    head = k * W + __builtin_ctz(bits);
    alive[k] &= ~(1u << (head % W));
    kept.push_back(c.id[head]);

    const Vec ix1(c.x1[head]), iy1(c.y1[head]), ix2(c.x2[head]), iy2(c.y2[head]), ia(c.area[head]);
    for (int64_t kk = k; kk * W < m; ++kk) {
      const uint32_t a = alive[kk];
      if (a == 0) continue;
      const int64_t r = kk * W;
      const Vec jx1 = Vec::loadu(&c.x1[r]), jy1 = Vec::loadu(&c.y1[r]), jx2 = Vec::loadu(&c.x2[r]),
                jy2 = Vec::loadu(&c.y2[r]), ja = Vec::loadu(&c.area[r]);
      const Vec inter = nm::box_inter<Ops>(ix1, iy1, ix2, iy2, jx1, jy1, jx2, jy2);
      if (th.filter) {
        const Vec uni = Ops::sub(Ops::add(ia, ja), inter);
        const uint32_t safe = cmp_bits<Cmp::GE>(uni, vtiny) & cmp_bits<Cmp::LE>(inter, Ops::mul(uni, vlo));
        if ((a & ~safe) == 0) continue;
      }
      const uint32_t sup = cmp_bits<Cmp::GT>(nm::box_iou_from_inter<Ops>(inter, ia, ja), vthr) & a;
      if (sup) {
        alive[kk] = a & ~sup;
        dead += __builtin_popcount(sup);
      }
    }

    if (dead * 4 > m - head && m - head > 4 * W) {  // compact the survivors after head to the front
      int64_t w = 0;
      for (int64_t r = head + 1; r < m; ++r) {
        if (!((alive[r / W] >> (r % W)) & 1)) continue;
        c.x1[w] = c.x1[r], c.y1[w] = c.y1[r], c.x2[w] = c.x2[r], c.y2[w] = c.y2[r], c.area[w] = c.area[r];
        c.id[w++] = c.id[r];
      }
      m = w;
      reset_alive(m);
      head = 0;
      dead = 0;
    }
  }
}

// Stable order of all scores, descending (ties by lower index).
template <typename scalar_t>
std::vector<int32_t> score_order(const at::Tensor& scores) {
  const int64_t n = scores.numel();
  const scalar_t* s = scores.const_data_ptr<scalar_t>();
  std::vector<int32_t> order(n);
  if constexpr (std::is_same_v<scalar_t, double>) {
    std::vector<uint64_t> key(n), kb;
    std::vector<int32_t> ib;
    for (int64_t i = 0; i < n; ++i) key[i] = desc_key(s[i]);
    radix_argsort(key.data(), n, order.data(), kb, ib);
  } else {
    std::vector<uint32_t> key(n), kb;
    std::vector<int32_t> ib;
    for (int64_t i = 0; i < n; ++i) key[i] = desc_key(static_cast<float>(s[i]));
    radix_argsort(key.data(), n, order.data(), kb, ib);
  }
  return order;
}

// Runs greedy NMS on each group (a run of `ranked` positions, all in score
// order) and sets keep[box] for the kept boxes.
template <typename scalar_t>
void nms_groups(const at::Tensor& boxes, const std::vector<int32_t>& ranked, const std::vector<int64_t>& group_start,
                double iou_threshold, std::vector<uint8_t>& keep) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const SweepThreshold<T> th(iou_threshold);
  const scalar_t* b = boxes.const_data_ptr<scalar_t>();
  const int64_t groups = static_cast<int64_t>(group_start.size()) - 1;

  auto run_group = [&](int64_t g, Candidates<T>& c, std::vector<int32_t>& kept) {
    const int64_t begin = group_start[g], m = group_start[g + 1] - begin;
    c.resize(m);
    for (int64_t r = 0; r < m; ++r) {
      const int32_t i = ranked[begin + r];
      c.x1[r] = static_cast<T>(b[4 * i]);
      c.y1[r] = static_cast<T>(b[4 * i + 1]);
      c.x2[r] = static_cast<T>(b[4 * i + 2]);
      c.y2[r] = static_cast<T>(b[4 * i + 3]);
      c.area[r] = nm::box_area<nm::ScalarOps<T>>(c.x1[r], c.y1[r], c.x2[r], c.y2[r]);
      c.id[r] = i;
    }
    kept.clear();
    greedy_sweep<T>(c, m, th, kept);
    for (int32_t i : kept) keep[i] = 1;  // groups are disjoint: no two threads write one byte
  };

  // Work ~ sum of m^2 (sparse data keeps most boxes); below ~4M pair-lanes a
  // second thread costs more to wake than it saves.
  int64_t work = 0;  // <= N^2 < 2^62
  for (int64_t g = 0; g < groups; ++g) work += (group_start[g + 1] - group_start[g]) * (group_start[g + 1] - group_start[g]);
  const int threads = at::get_num_threads();
  if (groups == 1 || threads == 1 || work < 4'000'000) {
    Candidates<T> c;
    std::vector<int32_t> kept;
    for (int64_t g = 0; g < groups; ++g) run_group(g, c, kept);
    return;
  }
  std::vector<int64_t> by_size(groups);  // largest first: the long pole starts early
  std::iota(by_size.begin(), by_size.end(), 0);
  std::stable_sort(by_size.begin(), by_size.end(), [&](int64_t a, int64_t z) {
    return group_start[a + 1] - group_start[a] > group_start[z + 1] - group_start[z];
  });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Candidates<T> c;
    std::vector<int32_t> kept;
    for (int64_t k = next++; k < groups; k = next++) run_group(by_size[k], c, kept);
  });
}

void check_boxes(const char* op, const at::Tensor& boxes, const at::Tensor& scores) {
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, "pycompress::", op,
                    ": boxes should be a 2d tensor of shape (N, 4), got ", boxes.sizes());
  TORCH_CHECK_VALUE(scores.dim() == 1, "pycompress::", op, ": scores should be a 1d tensor, got ", scores.dim(), "D");
  TORCH_CHECK_VALUE(boxes.size(0) == scores.size(0), "pycompress::", op, ": boxes and scores should have the same ",
                    "number of elements in dimension 0, got ", boxes.size(0), " and ", scores.size(0));
  TORCH_CHECK_TYPE(boxes.scalar_type() == scores.scalar_type(), "pycompress::", op, ": boxes (", boxes.scalar_type(),
                   ") and scores (", scores.scalar_type(), ") should have the same dtype");
  TORCH_CHECK_TYPE(at::isFloatingType(boxes.scalar_type()), "pycompress::", op,
                   ": boxes should be a floating-point tensor, got ", boxes.scalar_type());
  TORCH_CHECK_VALUE(boxes.size(0) < std::numeric_limits<int32_t>::max(), "pycompress::", op,
                    ": at most 2^31 - 2 boxes are supported, got ", boxes.size(0));
}

// Kept indices in the global score order.
at::Tensor gather_kept(const std::vector<int32_t>& order, const std::vector<uint8_t>& keep) {
  std::vector<int64_t> out;
  out.reserve(order.size());
  for (int32_t i : order)
    if (keep[i]) out.push_back(i);
  at::Tensor t = at::empty({static_cast<int64_t>(out.size())}, at::kLong);
  std::copy(out.begin(), out.end(), t.data_ptr<int64_t>());
  return t;
}

at::Tensor batched_nms_impl(const char* op, const at::Tensor& boxes_in, const at::Tensor& scores_in,
                            const at::Tensor* idxs_in, double iou_threshold) {
  check_boxes(op, boxes_in, scores_in);
  const int64_t n = boxes_in.size(0);
  if (n == 0) return at::empty({0}, boxes_in.options().dtype(at::kLong));
  const at::Tensor boxes = boxes_in.contiguous(), scores = scores_in.contiguous();
  std::vector<int32_t> order;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "nms_order",
                                  [&] { order = score_order<scalar_t>(scores); });

  // Group the score-ordered positions by category, each group keeping score order.
  std::vector<int32_t> ranked;
  std::vector<int64_t> group_start;
  if (idxs_in == nullptr) {
    ranked = order;
    group_start = {0, n};
  } else {
    const at::Tensor idxs = idxs_in->to(at::kLong).contiguous();
    const int64_t* cat = idxs.const_data_ptr<int64_t>();
    std::vector<int64_t> values(cat, cat + n);
    std::sort(values.begin(), values.end());
    values.erase(std::unique(values.begin(), values.end()), values.end());
    const int64_t groups = static_cast<int64_t>(values.size());
    std::vector<int32_t> group_of(n);
    for (int64_t i = 0; i < n; ++i)
      group_of[i] = static_cast<int32_t>(std::lower_bound(values.begin(), values.end(), cat[i]) - values.begin());
    group_start.assign(groups + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++group_start[group_of[i] + 1];
    std::partial_sum(group_start.begin(), group_start.end(), group_start.begin());
    std::vector<int64_t> fill(group_start.begin(), group_start.end() - 1);
    ranked.resize(n);
    for (int32_t i : order) ranked[fill[group_of[i]]++] = i;  // counting sort: stable
  }

  std::vector<uint8_t> keep(n, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, boxes.scalar_type(), "nms_cpu", [&] {
    nms_groups<scalar_t>(boxes, ranked, group_start, iou_threshold, keep);
  });
  return gather_kept(order, keep);
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  return batched_nms_impl("nms", boxes, scores, nullptr, iou_threshold);
}

at::Tensor batched_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                           double iou_threshold) {
  TORCH_CHECK_VALUE(idxs.dim() == 1 && idxs.size(0) == boxes.size(0), "pycompress::batched_nms: idxs should be a ",
                    "1d tensor with one entry per box (", boxes.size(0), "), got shape ", idxs.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(idxs.scalar_type()) && !at::isComplexType(idxs.scalar_type()),
                   "pycompress::batched_nms: idxs should be an integer tensor, got ", idxs.scalar_type());
  return batched_nms_impl("batched_nms", boxes, scores, &idxs, iou_threshold);
}

// ---------------------------------------------------------------------------
// FM-NMS

// Class argmax of every candidate of one image: cls[a*HW + hw]. First maximum
// wins and NaN counts as the maximum, as torch.argmax. This generic version
// serves fp16 and bf16, widened exactly to fp32.
template <typename scalar_t>
void class_argmax(const scalar_t* p, int64_t A, int64_t C, int64_t HW, int32_t* cls, std::vector<float>& best) {
  best.resize(HW);
  for (int64_t a = 0; a < A; ++a) {
    const scalar_t* pa = p + a * C * HW;
    int32_t* ca = cls + a * HW;
    for (int64_t hw = 0; hw < HW; ++hw) best[hw] = static_cast<float>(pa[hw]);
    std::fill(ca, ca + HW, 0);
    for (int64_t c = 1; c < C; ++c) {
      const scalar_t* pc = pa + c * HW;
      for (int64_t hw = 0; hw < HW; ++hw) {
        const float v = static_cast<float>(pc[hw]);
        if (v > best[hw] || (std::isnan(v) && !std::isnan(best[hw]))) {
          best[hw] = v;
          ca[hw] = static_cast<int32_t>(c);
        }
      }
    }
  }
}

// fp32: vectorized over cells, classes in the outer loop so that every read
// streams through memory; the running class index is kept as a float (exact
// below 2^24 classes).
template <>
void class_argmax<float>(const float* p, int64_t A, int64_t C, int64_t HW, int32_t* cls, std::vector<float>& scratch) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  scratch.resize(2 * HW);
  float* best = scratch.data();
  float* idx = best + HW;
  for (int64_t a = 0; a < A; ++a) {
    const float* pa = p + a * C * HW;
    std::copy(pa, pa + HW, best);
    std::fill(idx, idx + HW, 0.0f);
    for (int64_t c = 1; c < C; ++c) {
      const float* pc = pa + c * HW;
      const Vec vc(static_cast<float>(c));
      int64_t hw = 0;
      for (; hw + W <= HW; hw += W) {
        const Vec v = Vec::loadu(pc + hw), b = Vec::loadu(best + hw);
#if defined(CPU_CAPABILITY_AVX512)
        // Mask compares and masked stores: only the lanes that change are written.
        const __mmask16 take = _mm512_cmp_ps_mask(v, b, _CMP_GT_OQ) |
                               (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) & _mm512_cmp_ps_mask(b, b, _CMP_ORD_Q));
        _mm512_mask_storeu_ps(best + hw, take, v);
        _mm512_mask_storeu_ps(idx + hw, take, vc);
#else
        const Vec take = (v > b) | ((v != v) & (b == b));
        Vec::blendv(b, v, take).store(best + hw);
        Vec::blendv(Vec::loadu(idx + hw), vc, take).store(idx + hw);
#endif
      }
      for (; hw < HW; ++hw) {
        if (pc[hw] > best[hw] || (std::isnan(pc[hw]) && !std::isnan(best[hw]))) {
          best[hw] = pc[hw];
          idx[hw] = static_cast<float>(c);
        }
      }
    }
    int32_t* ca = cls + a * HW;
    for (int64_t hw = 0; hw < HW; ++hw) ca[hw] = static_cast<int32_t>(idx[hw]);
  }
}

template <>
void class_argmax<double>(const double* p, int64_t A, int64_t C, int64_t HW, int32_t* cls, std::vector<float>&) {
  for (int64_t a = 0; a < A; ++a) {
    for (int64_t hw = 0; hw < HW; ++hw) {
      const double* q = p + a * C * HW + hw;
      double b = q[0];
      int32_t k = 0;
      for (int64_t c = 1; c < C; ++c) {
        const double v = q[c * HW];
        if (v > b || (std::isnan(v) && !std::isnan(b))) {
          b = v;
          k = static_cast<int32_t>(c);
        }
      }
      cls[a * HW + hw] = k;
    }
  }
}

template <typename obj_t, typename prob_t>
void fm_nms_images(const at::Tensor& obj, const at::Tensor& probs, int64_t radius, at::Tensor& keep) {
  const int64_t B = obj.size(0), A = obj.size(1), H = obj.size(2), W = obj.size(3), C = probs.size(2);
  const int64_t HW = H * W, N = A * HW;
  const obj_t* o = obj.const_data_ptr<obj_t>();
  const prob_t* p = probs.const_data_ptr<prob_t>();
  bool* out = keep.data_ptr<bool>();
  using key_t = std::conditional_t<std::is_same_v<obj_t, double>, uint64_t, uint32_t>;
  // Per cell, the window's first row offset and its column range; per
  // candidate, its cell. Shared by all images, and it keeps integer divisions
  // out of the per-candidate loop.
  struct Window {
    int32_t row0, rows, w0, w1;
  };
  std::vector<Window> window(HW);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t w = 0; w < W; ++w) {
      const int64_t h0 = std::max<int64_t>(0, h - radius), h1 = std::min<int64_t>(H - 1, h + radius);
      window[h * W + w] = {static_cast<int32_t>(h0 * W), static_cast<int32_t>(h1 - h0 + 1),
                           static_cast<int32_t>(std::max<int64_t>(0, w - radius)),
                           static_cast<int32_t>(std::min<int64_t>(W - 1, w + radius))};
    }
  }
  std::vector<int32_t> cell(N);
  for (int64_t i = 0; i < N; ++i) cell[i] = static_cast<int32_t>(i % HW);

  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, N * C));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> cls(N), order(N), ib;
    std::vector<key_t> key(N), kb;
    std::vector<float> best;
    std::vector<uint8_t> blocked(C * HW);  // blocked[c*HW + hw]: a kept class-c candidate is within the window
    for (int64_t b = b0; b < b1; ++b) {
      class_argmax<prob_t>(p + b * A * C * HW, A, C, HW, cls.data(), best);
      const obj_t* ob = o + b * N;
      for (int64_t i = 0; i < N; ++i) {
        // A NaN objectness is no evidence of an object: it ranks last (after -inf), so it never
        // suppresses a real candidate. (nms keeps torchvision's order, NaN scores first.)
        if (std::isnan(static_cast<double>(ob[i]))) key[i] = std::numeric_limits<key_t>::max();
        else if constexpr (std::is_same_v<obj_t, double>) key[i] = desc_key(ob[i]);
        else key[i] = desc_key(static_cast<float>(ob[i]));
      }
      radix_argsort(key.data(), N, order.data(), kb, ib);
      std::fill(blocked.begin(), blocked.end(), 0);
      bool* kb_out = out + b * N;
      for (int64_t r = 0; r < N; ++r) {
        const int32_t i = order[r], hw = cell[i];
        uint8_t* plane = blocked.data() + static_cast<int64_t>(cls[i]) * HW;
        const bool keep_i = !plane[hw];
        kb_out[i] = keep_i;
        if (!keep_i) continue;
        const Window& win = window[hw];
        // K is small: byte ORs, which compilers keep inline (a store loop of 1s
        // becomes a memset call, which costs more than the K bytes it writes).
        uint8_t* row = plane + win.row0;
        for (int32_t y = 0; y < win.rows; ++y, row += W) {
          for (int32_t x = win.w0; x <= win.w1; ++x) row[x] |= 1;
        }
      }
    }
  });
}

at::Tensor fm_nms_cpu(const at::Tensor& objectness_in, const at::Tensor& class_probs_in, int64_t kernel_size) {
  TORCH_CHECK_VALUE(objectness_in.dim() == 4, "pycompress::fm_nms: objectness should be (B, A, H, W), got ",
                    objectness_in.dim(), "D");
  TORCH_CHECK_VALUE(class_probs_in.dim() == 5, "pycompress::fm_nms: class_probs should be (B, A, C, H, W), got ",
                    class_probs_in.dim(), "D");
  const auto os = objectness_in.sizes(), ps = class_probs_in.sizes();
  TORCH_CHECK_VALUE(ps[0] == os[0] && ps[1] == os[1] && ps[3] == os[2] && ps[4] == os[3],
                    "pycompress::fm_nms: class_probs ", ps, " should be objectness ", os, " with a class dim at 2");
  TORCH_CHECK_VALUE(ps[2] >= 1, "pycompress::fm_nms: class_probs should have at least one class");
  TORCH_CHECK_VALUE(kernel_size >= 1 && kernel_size % 2 == 1,
                    "pycompress::fm_nms: kernel_size should be a positive odd integer, got ", kernel_size);
  TORCH_CHECK_TYPE(at::isFloatingType(objectness_in.scalar_type()) && at::isFloatingType(class_probs_in.scalar_type()),
                   "pycompress::fm_nms: objectness and class_probs should be floating-point, got ",
                   objectness_in.scalar_type(), " and ", class_probs_in.scalar_type());
  TORCH_CHECK_VALUE(os[1] * os[2] * os[3] < std::numeric_limits<int32_t>::max(),
                    "pycompress::fm_nms: at most 2^31 - 2 candidates per image");
  const at::Tensor obj = objectness_in.contiguous(), probs = class_probs_in.contiguous();
  at::Tensor keep = at::empty(os, obj.options().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, obj.scalar_type(), "fm_nms_obj", [&] {
    using obj_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, probs.scalar_type(), "fm_nms_probs", [&] {
      fm_nms_images<obj_t, scalar_t>(obj, probs, kernel_size / 2, keep);
    });
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("nms", &nms_cpu);
  m.impl("batched_nms", &batched_nms_cpu);
  m.impl("fm_nms", &fm_nms_cpu);
}

}  // namespace pycompress
