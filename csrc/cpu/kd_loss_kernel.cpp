// Fused temperature-softmax knowledge-distillation loss, CPU kernel.
//
// Per row of student logits s and teacher logits t (V classes), with
// x = s/T, y = t/T, Q = softmax(x) (student), P = softmax(y) (teacher):
//   forward_kl  KL(P||Q) = sum P (y - x) + lse(x) - lse(y)    dKL/dx = Q - P
//   reverse_kl  KL(Q||P) = sum Q (x - y) + lse(y) - lse(x)    dKL/dx = Q (log Q - log P - KL)
//   jsd         b KL(P||M) + (1-b) KL(Q||M), M = bP + (1-b)Q  dJSD/dx = (1-b) Q (log(Q/M) - KL(Q||M))
//   mse_logits  1/2 sum (s - t)^2 (no temperature)            d/ds = s - t
// The row loss is alpha * scale * divergence + (1 - alpha) * CE(target, softmax(s)),
// scale = T^2 when t2_scale (Hinton), and d(row loss)/ds is written in the same
// call, already divided by the reduction's denominator: backward only scales.
//
// Dense divergences (DenseRows; rows in parallel, at::parallel_for, each thread a contiguous
// range). A row is worked in chunks of 1024 classes:
//   1. max of the chunk of s and t: the only loads from DRAM, prefetched into L2 during the
//      previous chunk's exps (-inf logits are found afterwards, by the NaN they leave in the
//      chunk's cross term, which then runs again with them masked);
//   2. e_s = 2^(c2 s - chunk shift), e_t likewise (c2 = log2(e) / T), from L1, into a
//      per-thread scratch row, with their sums: every exponential is computed exactly once
//      (two per element; three with a hard-label term at T != 1);
//   3. once the row is done, each chunk's normaliser 2^(shift - row max) / Z is known, and
//      the row's gradient is written from the scratch rows (streamed: no read-for-ownership)
//      chunk by chunk while the next row runs steps 1-2, so that DRAM traffic and exps overlap.
// Memory traffic: reads 2*N*V*sizeof(scalar), writes N*V*sizeof(scalar); nothing else of size
// N*V exists. The scratch is two rows of e_s and e_t per thread (512 KiB at V = 32k).
// Where the time goes (Zen 3, AVX2, 1 thread, N = 1024, V = 32000, quiet machine, medians):
// the kernel is compute-bound. fp32: a torch.add(out=) roofline takes 21.9 ms, the exps alone
// (pycompress::_kd_loss_exp_floor) 13.6 ms, the loss without the gradient (steps 1-2: the
// maxima, the exps stored to scratch, the sums and cross term) 33.9 ms, forward + backward
// 49.4 ms. So the instructions around the exps (11 vector ops each, 6 on the FMA pipes) cost
// as much as the exps, and the gradient pass 15 ms more. DRAM is not what is missing: with s
// and t in L3 (N = 16) the forward takes as long per row as from DRAM. Without the next-chunk
// prefetch the forward took 43 ms; prefetching 2-8 chunks ahead measured no better. The max
// pass used to look for -inf with two vector mins per element as well; finding them through the
// cross term instead (step 1) took the forward 17.7 -> 14.5 ms and forward + backward 20.2 ->
// 18.6 ms (1 thread, N = 512, T = 2, fastest of 8 processes each, alternated).
// bf16: the max pass keeps the chunk's widened fp32 lanes (8 KiB, in L1) for the exp loop;
// widening every element a second time there had cost the forward 46.5 ms against 30.8 now
// (exps 16.0 ms, forward + backward 50.1 -> 41.2 ms; fp32 in the same run 31.7 / 38.4 ms).
// bf16 moves half the bytes with the same exps, so its limit is the compute floor. The
// gradient buffer costs no page faults after the first call (hugepage_alloc.h recycles it).
// Numerics: fp32 lanes for fp32/bf16/fp16 (fp64 for fp64), max-shifted exponentials.
// Row sums fold into fp64 every 16 vectors and the divergence is combined from them in
// fp64, since at high T it is a small difference of two log-sums of about log(V): on
// (2, 32768) at T = 1..20 the row loss stays within 1e-6 of float64 (eager fp32: up to
// 4e-5). JSD's logs are of the ratios Q/M and P/M. Row losses are summed in fp64 in row
// order, so the result does not depend on the thread count. NaN and +inf in a row propagate
// as NaN; a -inf logit is a masked class of probability 0 (0 log 0 = 0, zero gradient).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/hugepage_alloc.h"
#include "cpu/vec_io.h"
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace pycompress {
namespace {

using at::vec::Vectorized;

enum class Divergence { ForwardKL, ReverseKL, JSD, MSELogits };
enum class Reduction { None, Sum, Mean, BatchMean };

Divergence parse_divergence(c10::string_view name) {
  if (name == "forward_kl") return Divergence::ForwardKL;
  if (name == "reverse_kl") return Divergence::ReverseKL;
  if (name == "jsd") return Divergence::JSD;
  if (name == "mse_logits") return Divergence::MSELogits;
  TORCH_CHECK_VALUE(false, "pycompress::kd_loss: divergence must be one of forward_kl, reverse_kl, jsd, "
                    "mse_logits, got '", name, "'");
}

Reduction parse_reduction(c10::string_view name) {
  if (name == "none") return Reduction::None;
  if (name == "sum") return Reduction::Sum;
  if (name == "mean") return Reduction::Mean;
  if (name == "batchmean") return Reduction::BatchMean;
  TORCH_CHECK_VALUE(false, "pycompress::kd_loss: reduction must be one of none, sum, mean, batchmean, got '",
                    name, "'");
}

// Lane loads and stores in the compute type (cpu/vec_io.h), plus a streaming store.
template <typename scalar_t>
struct Io : VecIo<scalar_t> {
  using typename VecIo<scalar_t>::Vec;
  // For the gradient, written once and read much later: a non-temporal store skips
  // each line's read-for-ownership and does not evict the row's working set. bf16 and
  // fp16 stream the packed half vector.
  static void store_stream(scalar_t* p, const Vec& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    const auto aligned = [p](size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
    if (n == Vec::size()) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (aligned(sizeof(Vec))) {
#if defined(CPU_CAPABILITY_AVX512)
          _mm512_stream_ps(p, v);
#else
          _mm256_stream_ps(p, v);
#endif
          return;
        }
      }
      if constexpr (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>) {
        if (aligned(sizeof(Vec) / 2)) {
          const auto packed = at::vec::convert_from_float<scalar_t>(v, v);  // v's lanes come first
#if defined(CPU_CAPABILITY_AVX512)
          _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(packed));
#else
          _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#endif
          return;
        }
      }
    }
#endif
    VecIo<scalar_t>::store(p, v, n);
  }
};

// max(a, b) in one instruction with x86 maxps semantics: b when either is NaN. at::vec::maximum
// spends three on propagating NaN; the dense kernel does not need it from its maxima, since a NaN
// logit reaches the row sums through its own exponential.
template <typename Vec>
inline Vec max_one_op(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) return Vec(_mm512_max_ps(a, b));
  if constexpr (std::is_same_v<Vec, Vectorized<double>>) return Vec(_mm512_max_pd(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) return Vec(_mm256_max_ps(a, b));
  if constexpr (std::is_same_v<Vec, Vectorized<double>>) return Vec(_mm256_max_pd(a, b));
#endif
  return at::vec::maximum(a, b);
}

// 2^z for z < 128 (callers pass max-shifted logits in log2 units, z <= 0 up to rounding). fp32:
// z = n + f with n = round(z), f in [-1/2, 1/2]; 2^f is a degree-5 polynomial fitted for relative
// error (at most 1.9e-7, mean -2e-8: several times tighter than at::vec's exp_u20). Rounding adds
// 1.5 * 2^23 + 127, which leaves n + 127 in the low mantissa bits: shifted up by 23 they are the
// bits of 2^n. 11 vector ops (exp_u20: 17), six on the FMA pipes. z is clamped at -127, where
// 2^n has the bit pattern 0, so a very negative (or -inf) argument gives exactly 0; NaN
// propagates (the clamp keeps its second operand). fp64: Sleef's exp2.
template <typename Vec>
inline Vec fast_exp2(const Vec& z_in) {
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    constexpr float kRoundBias = 12582912.f + 127.f;  // 1.5 * 2^23 + 127, exact in fp32
    const Vec z = max_one_op(Vec(-127.f), z_in);
    const Vec rounded = z + Vec(kRoundBias);
    const Vec f = z - (rounded - Vec(kRoundBias));
    Vec poly = at::vec::fmadd(f, Vec(0.0013264723820611835f), Vec(0.009671512991189957f));
    poly = at::vec::fmadd(f, poly, Vec(0.05550733581185341f));
    poly = at::vec::fmadd(f, poly, Vec(0.24022242426872253f));
    poly = at::vec::fmadd(f, poly, Vec(0.6931470036506653f));
    poly = at::vec::fmadd(f, poly, Vec(1.f));
    const Vectorized<int32_t> pow2n = at::vec::cast<int32_t>(rounded) << Vectorized<int32_t>(23);
    return poly * at::vec::cast<float>(pow2n);
  } else {
    return z_in.exp2();
  }
}

// exp(v) for v <= 0, through fast_exp2.
template <typename Vec>
inline Vec fast_exp(const Vec& v) {
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    return fast_exp2(v * Vec(1.44269504088896341f));
  } else {
    return v.exp();
  }
}

// Keeps the first n lanes of v, fills the rest with `fill` (a no-op for full vectors).
template <typename Vec, typename acc_t>
inline Vec keep(const Vec& v, int64_t n, acc_t fill) {
  return n == Vec::size() ? v : Vec::set(Vec(fill), v, n);
}

template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return at::vec::maximum(a, b); }, v);
}

// Calls f(j, n) over [0, V) in steps of W; n == W except for the tail.
template <int64_t W, typename F>
inline void for_chunks(int64_t V, const F& f) {
  int64_t j = 0;
  for (; j + W <= V; j += W) f(j, W);
  if (j < V) f(j, V - j);
}

// A row sum accurate to a few ulps whatever V: vector lanes accumulate in acc_t over runs of
// at most kRun vectors, and each run's lanes are folded into an fp64 total. A plain fp32 lane
// sum of a 32k row grows an error of ~sqrt(V / W) ulps, which at high temperature is the
// same size as the divergence itself (a small difference of two log-sums).
template <typename acc_t>
struct RowSum {
  static constexpr int64_t kRun = 16;
  Vectorized<acc_t> run = Vectorized<acc_t>(acc_t(0));
  double total = 0;
  void operator+=(const Vectorized<acc_t>& v) { run += v; }
  void fold() {
    acc_t lanes[Vectorized<acc_t>::size()];
    run.store(lanes);
    for (acc_t x : lanes) total += x;
    run = Vectorized<acc_t>(acc_t(0));
  }
};

// for_chunks that folds `sums` (RowSums) every RowSum::kRun chunks and at the end.
template <int64_t W, typename F, typename... Sums>
inline void for_chunks_summed(int64_t V, const F& f, Sums&... sums) {
  constexpr int64_t kSpan = 16 * W;
  for (int64_t start = 0; start < V; start += kSpan) {
    for_chunks<W>(std::min(kSpan, V - start), [&](int64_t j, int64_t n) { f(start + j, n); });
    (sums.fold(), ...);
  }
}

template <typename acc_t>
struct RowParams {
  acc_t inv_t;      // 1 / T
  acc_t soft_coef;  // alpha * (T^2 or 1): weight of the divergence in the row loss
  acc_t hard_coef;  // 1 - alpha: weight of the cross-entropy
  acc_t beta;       // JSD mixture weight of the teacher
  bool need_ce;     // hard_coef != 0 and a target is given
  bool t_is_one;    // then CE reuses the divergence's softmax
};

// The CE gradient's -1 at the target class: subtracts `amount` from the lane of gv
// holding class `target`, when the chunk [j, j + n) holds it.
template <typename Vec, typename acc_t>
inline Vec subtract_at_target(const Vec& gv, int64_t target, int64_t j, int64_t n, acc_t amount) {
  if (target < j || target >= j + n) return gv;
  acc_t tmp[Vec::size()];
  gv.store(tmp);
  tmp[target - j] -= amount;
  return Vec::loadu(tmp);
}

// kd_row for logit regression (mse_logits): one pass, the divergence needs no
// softmax; CE (if any) needs lse(s).
template <typename scalar_t>
typename Io<scalar_t>::acc_t kd_row_mse(const scalar_t* s, const scalar_t* t, int64_t V, int64_t target,
                                        bool need_ce, scalar_t* g, typename Io<scalar_t>::acc_t gscale,
                                        const RowParams<typename Io<scalar_t>::acc_t>& p) {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t ms = 0, lz1 = 0;
  if (need_ce) {
    Vec vm(kNegInf);
    for_chunks<W>(V, [&](int64_t j, int64_t n) { vm = at::vec::maximum(vm, keep(IO::load(s + j, n), n, kNegInf)); });
    ms = hmax(vm);
    RowSum<acc_t> z;
    for_chunks_summed<W>(V, [&](int64_t j, int64_t n) { z += keep(fast_exp(IO::load(s + j, n) - Vec(ms)), n, acc_t(0)); }, z);
    lz1 = static_cast<acc_t>(std::log(z.total));
  }
  const acc_t iz1 = need_ce ? std::exp(-lz1) : acc_t(0);
  RowSum<acc_t> sq;
  const Vec half(0.5), gsoft(p.soft_coef * gscale), ghard(p.hard_coef * gscale);
  for_chunks_summed<W>(V, [&](int64_t j, int64_t n) {
    const Vec xs = IO::load(s + j, n);
    const Vec d = xs - IO::load(t + j, n);
    sq += keep(half * d * d, n, acc_t(0));
    if (g) {
      Vec gv = gsoft * d;
      if (need_ce) gv = subtract_at_target(gv + ghard * fast_exp(xs - Vec(ms)) * Vec(iz1), target, j, n,
                                           p.hard_coef * gscale);
      IO::store_stream(g + j, gv, n);
    }
  }, sq);
  acc_t loss = p.soft_coef * static_cast<acc_t>(sq.total);
  if (need_ce) loss += p.hard_coef * (ms + lz1 - static_cast<acc_t>(s[target]));
  return loss;
}

// The dense kernel works on chunks of kChunk classes: a chunk of s and t (8 KiB in fp32) is read
// from DRAM by its max loop and re-read from L1 by its exp loop.
constexpr int64_t kChunk = 1024;

// Rows of the dense divergences (forward KL, reverse KL, JSD) over one thread's range of rows.
// Each exponential is taken once, relative to its chunk's maximum, into a scratch row; a chunk's
// normaliser 2^(chunk max - row max) / Z is known when the row is done. Row r's gradient is
// written while row r + 1 takes its exponentials, chunk by chunk, so that DRAM reads, gradient
// stores and exps overlap all along the row instead of alternating memory-bound and
// compute-bound passes. Rows alternate their chunk order: the scratch chunk a row's gradient
// needs first is the one its exp loop wrote last (still in L2).
template <Divergence D, typename scalar_t>
class DenseRows {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  static constexpr double kLn2 = 0.69314718055994531;
  static constexpr double kLog2e = 1.44269504088896341;

  struct Row {
    std::vector<acc_t> scratch;
    acc_t* es = nullptr;  // 2^(zs - its chunk's max): the student's unnormalised tempered softmax
    acc_t* et = nullptr;  // forward KL: the teacher's likewise; JSD: then log(Q/M); reverse KL: s - t
    acc_t* e1 = nullptr;  // cross-entropy at T != 1: exp(s - its chunk's max)
    std::vector<acc_t> fs, ft, f1;  // per chunk: the factor normalising its es, et, e1
    scalar_t* g = nullptr;          // the gradient row
    int64_t target = -1;            // the CE class, or -1
    acc_t log_ratio0 = 0, div = 0, kl_qm = 0;
  };

 public:
  DenseRows(int64_t V, const RowParams<acc_t>& p, acc_t gscale)
      : V_(V), C_((V + kChunk - 1) / kChunk), p_(p), ce_extra_(p.need_ce && !p.t_is_one),
        c2_(static_cast<acc_t>(p.inv_t * kLog2e)), kappa_(static_cast<double>(c2_) * kLn2),
        gsoft_(static_cast<acc_t>(p.soft_coef * kappa_ * gscale)), ghard_(p.hard_coef * gscale) {
    const int64_t vpad = (V + W - 1) / W * W;
    const int64_t slots = ce_extra_ ? 3 : 2;
    for (Row& r : rows_) {
      r.scratch.resize(slots * vpad);
      r.es = r.scratch.data();
      r.et = r.es + vpad;
      r.e1 = ce_extra_ ? r.et + vpad : nullptr;
      r.fs.resize(C_);
      r.ft.resize(C_);
      r.f1.resize(C_);
    }
    for (auto* v : {&shift_s_, &shift_t_, &shift_1_, &z_s_, &z_t_, &z_1_, &cross_, &w_s_, &w_t_, &w_1_}) v->resize(C_);
  }

  // The loss of one row (s, t); with g, its gradient is written by the next call or by finish().
  // next_s and next_t (or nullptr) are the row that follows, prefetched meanwhile.
  acc_t row(const scalar_t* s, const scalar_t* t, int64_t target, scalar_t* g, const scalar_t* next_s,
            const scalar_t* next_t) {
    Row& cur = pending_ == &rows_[0] ? rows_[1] : rows_[0];
    reversed_ = !reversed_;
    for (int64_t k = 0; k < C_; ++k) {
      const int64_t c = reversed_ ? C_ - 1 - k : k;
      // The chunk processed next: this row's next one, else the next row's first (the same c).
      const int64_t next_c = k + 1 < C_ ? (reversed_ ? c - 1 : c + 1) : c;
      // Without a next row it prefetches the current chunk again, which costs nothing.
      const scalar_t* ps = k + 1 < C_ || !next_s ? s : next_s;
      const scalar_t* pt = k + 1 < C_ || !next_t ? t : next_t;
      exp_chunk(cur, s, t, c, ps + next_c * kChunk, pt + next_c * kChunk);
      if (pending_) grad_chunk(*pending_, c);
    }
    const acc_t loss = finish_row(cur, s, target);
    cur.g = g;
    pending_ = g ? &cur : nullptr;
    return loss;
  }

  // Writes the pending row's gradient.
  void finish() {
    if (pending_)
      for (int64_t c = 0; c < C_; ++c) grad_chunk(*pending_, c);
    pending_ = nullptr;
  }

 private:
  struct ChunkSums {
    double zs, zt, cross, z1;
  };

  // A chunk's shift in log2 units: m * scale; a chunk of -inf logits only (masked classes) shifts
  // by 0, so that its exps are 0 rather than -inf - -inf.
  static acc_t shift_of(acc_t m, acc_t scale) { return m == kNegInf ? acc_t(0) : m * scale; }
  static double recorded_shift(acc_t m, acc_t shift) { return m == kNegInf ? -INFINITY : shift; }

  void exp_chunk(Row& cur, const scalar_t* s, const scalar_t* t, int64_t c, const scalar_t* prefetch_s,
                 const scalar_t* prefetch_t) {
    const int64_t j0 = c * kChunk, n = std::min(kChunk, V_ - j0);
    // The maxima: the chunk's only loads from DRAM.
    Vec vms(kNegInf), vmt(kNegInf);
    for_chunks<W>(n, [&](int64_t jj, int64_t nn) {
      const Vec sv = IO::load(s + j0 + jj, nn), tv = IO::load(t + j0 + jj, nn);
      if constexpr (kWidened) {  // the exp loop reads these fp32 lanes from L1, not the bf16/fp16 again
        sv.store(wide_s_.data() + jj);
        tv.store(wide_t_.data() + jj);
      }
      vms = max_one_op(vms, keep(sv, nn, kNegInf));
      vmt = max_one_op(vmt, keep(tv, nn, kNegInf));
    });
    const acc_t ms = hmax(vms), mt = hmax(vmt);
    const acc_t shs = shift_of(ms, c2_), sht = shift_of(mt, c2_), sh1 = shift_of(ms, acc_t(kLog2e));
    shift_s_[c] = recorded_shift(ms, shs);
    shift_t_[c] = recorded_shift(mt, sht);
    shift_1_[c] = recorded_shift(ms, sh1);
    // The exps, from L1, while the next chunk comes from DRAM into L2.
    const acc_t* cs;
    const acc_t* ct;
    if constexpr (kWidened) {
      cs = wide_s_.data(), ct = wide_t_.data();
    } else {
      cs = s + j0, ct = t + j0;
    }
    const auto run = [&](bool has_neg_inf) {
      return ce_extra_ ? exp_loop<true>(cur, cs, ct, j0, n, shs, sht, sh1, has_neg_inf, prefetch_s, prefetch_t)
                       : exp_loop<false>(cur, cs, ct, j0, n, shs, sht, sh1, has_neg_inf, prefetch_s, prefetch_t);
    };
    // A -inf (masked) logit gives e = 0 and a 0 * inf = NaN in the cross term, where it must count
    // as 0. Rather than look for -inf in every chunk (two more vector ops per element in the max
    // pass), a NaN cross sum sends the chunk through again with the zeros masked: NaN logits stay
    // NaN there, so they still propagate.
    ChunkSums sums = run(false);
    if (std::isnan(sums.cross)) sums = run(true);
    z_s_[c] = sums.zs;
    z_t_[c] = sums.zt;
    cross_[c] = sums.cross;
    z_1_[c] = sums.z1;
  }

  // The exp loop of chunk [j0, j0 + n): stores the exps (and reverse KL's s - t), returns the sums
  // of e_s, e_t, the cross term and e_1. Plain loops over local accumulators (kept in registers:
  // behind references they lived in memory, a store-to-load chain per add), full vectors apart
  // from the tail, folded into fp64 lanes every RowSum<>::kRun vectors as RowSum does.
  // s and t point at the chunk in the compute type: the caller's logits, or (bf16/fp16) the fp32
  // lanes the max pass kept.
  template <bool kCeExtra>
  ChunkSums exp_loop(Row& cur, const acc_t* s, const acc_t* t, int64_t j0, int64_t n, acc_t shs,
                     acc_t sht, acc_t sh1, bool has_neg_inf, const scalar_t* prefetch_s,
                     const scalar_t* prefetch_t) {
    const Vec vc2(c2_), vshs(shs), vsht(sht), vl2e(static_cast<acc_t>(kLog2e)), vsh1(sh1);
    acc_t* const es = cur.es + j0;
    acc_t* const et = cur.et + j0;
    acc_t* const e1 = kCeExtra ? cur.e1 + j0 : nullptr;
    Vec zs(0), zt(0), cross(0), z1(0);
    const auto body = [&](auto full, int64_t j, int64_t nn) {
      constexpr bool kFull = decltype(full)::value;
      const auto kept = [nn](const Vec& v) { return kFull ? v : keep(v, nn, acc_t(0)); };
      // One prefetch per vector (a line holds one or more): cheaper than testing for line starts.
      __builtin_prefetch(prefetch_s + j, 0, 2);
      __builtin_prefetch(prefetch_t + j, 0, 2);
      const Vec sv = VecIo<acc_t>::load(s + j, kFull ? W : nn), tv = VecIo<acc_t>::load(t + j, kFull ? W : nn);
      const Vec e_s = kept(fast_exp2(at::vec::fmsub(sv, vc2, vshs)));
      const Vec e_t = kept(fast_exp2(at::vec::fmsub(tv, vc2, vsht)));
      e_s.store(es + j);
      zs += e_s;
      zt += e_t;
      // The cross term e * d, zero where e is (the chunk's -inf logits give d = +-inf there).
      const auto cross_term = [&](const Vec& e, const Vec& d) {
        return has_neg_inf ? cross + Vec::blendv(e * d, Vec(0), e == Vec(0)) : at::vec::fmadd(e, d, cross);
      };
      if constexpr (D == Divergence::ReverseKL) {
        const Vec d = sv - tv;
        d.store(et + j);
        cross = cross_term(e_s, d);
      } else {
        e_t.store(et + j);
        if constexpr (D == Divergence::ForwardKL) cross = cross_term(e_t, tv - sv);
      }
      if constexpr (kCeExtra) {
        const Vec e = kept(fast_exp2(at::vec::fmsub(sv, vl2e, vsh1)));
        e.store(e1 + j);
        z1 += e;
      }
    };
    constexpr int64_t kRun = RowSum<acc_t>::kRun * W;
    LaneTotals totals;
    for (int64_t run = 0; run < n; run += kRun) {
      const int64_t run_end = std::min(n, run + kRun);
      int64_t j = run;
      for (; j + W <= run_end; j += W) body(std::true_type{}, j, W);
      if (j < run_end) body(std::false_type{}, j, run_end - j);
      totals.add(0, zs);
      totals.add(1, zt);
      totals.add(2, cross);
      if constexpr (kCeExtra) totals.add(3, z1);
      zs = zt = cross = z1 = Vec(0);
    }
    return {totals.sum(0), totals.sum(1), totals.sum(2), totals.sum(3)};
  }

  // Four fp64 lane accumulators: adding a vector is two widening conversions and two adds.
  struct LaneTotals {
    double lanes[4][W] = {};
    void add(int k, const Vec& v) {
      acc_t x[W];
      v.store(x);
      for (int64_t i = 0; i < W; ++i) lanes[k][i] += x[i];
    }
    double sum(int k) const {
      double total = 0;
      for (int64_t i = 0; i < W; ++i) total += lanes[k][i];
      return total;
    }
  };

  // Combines the chunks' sums (in fp64) into the row loss and the chunks' normalisers.
  acc_t finish_row(Row& cur, const scalar_t* s, int64_t target) {
    const bool need_ce = p_.need_ce && target >= 0;
    double Ms = -INFINITY, Mt = -INFINITY, M1 = -INFINITY;
    for (int64_t c = 0; c < C_; ++c) {
      Ms = std::max(Ms, shift_s_[c]);
      Mt = std::max(Mt, shift_t_[c]);
      M1 = std::max(M1, shift_1_[c]);
    }
    double Zs = 0, Zt = 0, Z1 = 0, cross = 0;
    for (int64_t c = 0; c < C_; ++c) {
      w_s_[c] = std::exp2(shift_s_[c] - Ms);
      w_t_[c] = std::exp2(shift_t_[c] - Mt);
      Zs += z_s_[c] * w_s_[c];
      Zt += z_t_[c] * w_t_[c];
      cross += cross_[c] * (D == Divergence::ReverseKL ? w_s_[c] : w_t_[c]);
      if (ce_extra_) {
        w_1_[c] = std::exp2(shift_1_[c] - M1);
        Z1 += z_1_[c] * w_1_[c];
      }
    }
    for (int64_t c = 0; c < C_; ++c) {
      cur.fs[c] = static_cast<acc_t>(w_s_[c] / Zs);
      cur.ft[c] = static_cast<acc_t>(w_t_[c] / Zt);
      if (ce_extra_) cur.f1[c] = static_cast<acc_t>(w_1_[c] / Z1);
    }
    // Log-sum-exps of x = kappa s and y = kappa t (kappa = 1/T as rounded into c2_), combined
    // in fp64: at high T the divergence is a small difference of two log-sums of about log(V).
    const double lse_x = Ms * kLn2 + std::log(Zs), lse_y = Mt * kLn2 + std::log(Zt);
    double div = 0;
    if constexpr (D == Divergence::ForwardKL) div = kappa_ * cross / Zt + (lse_x - lse_y);
    if constexpr (D == Divergence::ReverseKL) div = kappa_ * cross / Zs + (lse_y - lse_x);
    if constexpr (D == Divergence::JSD) div = jsd(cur);
    double ce = 0;  // at T = 1: lse(s) - s[target]
    if (need_ce) ce = (ce_extra_ ? M1 * kLn2 + std::log(Z1) : lse_x) - static_cast<double>(s[target]);
    cur.target = need_ce ? target : -1;
    cur.div = static_cast<acc_t>(div);
    cur.log_ratio0 = static_cast<acc_t>(lse_x - lse_y);  // log Q - log P = kappa (s - t) - log_ratio0
    return static_cast<acc_t>(p_.soft_coef * div + (need_ce ? p_.hard_coef * ce : 0.0));
  }

  // JSD needs normalised P and Q, so its log terms wait for the row's sums. The logs are of the
  // ratios Q/M and P/M of the very values summed: taking log Q and log P from the logits instead
  // would subtract two separately rounded normalisers, an error of the divergence's own size at
  // high T. Zero-probability entries contribute 0 (0 log 0 = 0), also where M = 0. et is
  // overwritten with log(Q/M) for the gradient.
  double jsd(Row& cur) {
    const Vec b(p_.beta), b1(acc_t(1) - p_.beta), zero(0);
    RowSum<acc_t> js, kqm;
    for (int64_t c = 0; c < C_; ++c) {
      const int64_t j0 = c * kChunk;
      const Vec vfs(cur.fs[c]), vft(cur.ft[c]);
      for_chunks_summed<W>(std::min(kChunk, V_ - j0), [&](int64_t jj, int64_t) {
        const int64_t j = j0 + jj;
        const Vec q = Vec::loadu(cur.es + j) * vfs;
        const Vec pt = Vec::loadu(cur.et + j) * vft;
        const Vec m = b * pt + b1 * q;
        const Vec r = Vec::blendv((q / m).log(), zero, q == zero);
        const Vec tq = q * r;
        const Vec tp = Vec::blendv(pt * (pt / m).log(), zero, pt == zero);
        js += b * tp + b1 * tq;
        kqm += tq;
        r.store(cur.et + j);
      }, js, kqm);
    }
    cur.kl_qm = static_cast<acc_t>(kqm.total);
    return js.total;
  }

  // Chunk c of a finished row's gradient, streamed to its gradient row.
  void grad_chunk(const Row& r, int64_t c) {
    const int64_t j0 = c * kChunk, n = std::min(kChunk, V_ - j0);
    const bool ce = r.target >= 0;
    const acc_t fs = r.fs[c];
    acc_t soft_s = gsoft_ * fs;
    if constexpr (D == Divergence::JSD) soft_s *= acc_t(1) - p_.beta;
    const Vec vsoft_s(soft_s), vsoft_t(gsoft_ * r.ft[c]), vkappa(static_cast<acc_t>(kappa_));
    const Vec vshift(D == Divergence::ReverseKL ? r.log_ratio0 + r.div : r.kl_qm);
    const Vec vhard(ghard_ * (p_.t_is_one ? fs : r.f1[c]));
    const acc_t* const es = r.es;
    const acc_t* const et = r.et;
    const acc_t* const e1 = p_.t_is_one ? r.es : r.e1;
    scalar_t* const g = r.g;
    for (int64_t j = j0; j < j0 + n; j += W) {
      const int64_t nn = std::min(W, j0 + n - j);
      const Vec q = Vec::loadu(es + j);  // unnormalised
      Vec gv;
      if constexpr (D == Divergence::ForwardKL) {
        gv = at::vec::fmsub(q, vsoft_s, Vec::loadu(et + j) * vsoft_t);  // Q - P, scaled
      } else if constexpr (D == Divergence::ReverseKL) {
        // Q (log Q/P - KL); 0 where Q = 0 (there s may be -inf and log Q/P too)
        gv = Vec::blendv(q * vsoft_s * at::vec::fmsub(Vec::loadu(et + j), vkappa, vshift), Vec(0), q == Vec(0));
      } else {
        gv = q * vsoft_s * (Vec::loadu(et + j) - vshift);  // (1 - b) Q (log Q/M - KL(Q||M))
      }
      if (ce) {
        gv = at::vec::fmadd(Vec::loadu(e1 + j), vhard, gv);
        gv = subtract_at_target(gv, r.target, j, nn, ghard_);
      }
      IO::store_stream(g + j, gv, nn);
    }
  }

  const int64_t V_, C_;
  const RowParams<acc_t> p_;
  const bool ce_extra_;  // CE at T != 1 needs its own exps
  const acc_t c2_;       // log2(e) / T: the exps are 2^(c2 * logit - shift)
  const double kappa_;   // c2 ln 2: the 1/T the kernel computes with
  const acc_t gsoft_, ghard_;
  Row rows_[2];
  Row* pending_ = nullptr;  // the row whose gradient is still to write
  bool reversed_ = true;
  static constexpr bool kWidened = !std::is_same_v<scalar_t, acc_t>;  // bf16/fp16 computed in fp32
  std::vector<acc_t> wide_s_ = std::vector<acc_t>(kWidened ? kChunk : 0);  // the current chunk, widened
  std::vector<acc_t> wide_t_ = std::vector<acc_t>(kWidened ? kChunk : 0);
  // Per chunk of the current row: shifts (log2 units), sums of the exps, the cross term.
  std::vector<double> shift_s_, shift_t_, shift_1_, z_s_, z_t_, z_1_, cross_, w_s_, w_t_, w_1_;
};

template <Divergence D, typename scalar_t>
void kd_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* row_s, const int64_t* row_t,
             const int64_t* target, at::Tensor& grad, typename Io<scalar_t>::acc_t gscale,
             const RowParams<typename Io<scalar_t>::acc_t>& p, std::vector<double>& row_loss) {
  const int64_t N = static_cast<int64_t>(row_loss.size());
  const int64_t V = student.size(-1);
  const scalar_t* s = student.const_data_ptr<scalar_t>();
  const scalar_t* t = teacher.const_data_ptr<scalar_t>();
  scalar_t* g = grad.defined() ? grad.data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / V);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    if constexpr (D == Divergence::MSELogits) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = target ? target[r] : -1;
        scalar_t* g_row = g ? g + r * V : nullptr;
        if (y == -2) {  // ignored row: no loss, no gradient
          row_loss[r] = 0;
          if (g_row) std::fill(g_row, g_row + V, scalar_t(0));
          continue;
        }
        row_loss[r] = kd_row_mse(s + row_s[r], t + row_t[r], V, y, p.need_ce && y >= 0, g_row, gscale, p);
      }
    } else {
      DenseRows<D, scalar_t> rows(V, p, gscale);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = target ? target[r] : -1;
        scalar_t* g_row = g ? g + r * V : nullptr;
        if (y == -2) {
          rows.finish();
          row_loss[r] = 0;
          if (g_row) std::fill(g_row, g_row + V, scalar_t(0));
          continue;
        }
        const bool has_next = r + 1 < end;
        row_loss[r] = rows.row(s + row_s[r], t + row_t[r], y, g_row, has_next ? s + row_s[r + 1] : nullptr,
                               has_next ? t + row_t[r + 1] : nullptr);
      }
      rows.finish();
    }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    _mm_sfence();  // order the streamed gradient stores before the threads join
#endif
  });
}

// Element offsets of each row (all dims but the last) of a tensor whose last
// dim is contiguous: lets (B, L, V) slices such as logits[:, :-1] be read in
// place instead of copied.
std::vector<int64_t> row_offsets(const at::Tensor& x) {
  const int64_t nd = x.dim() - 1;
  int64_t rows = 1;
  for (int64_t d = 0; d < nd; ++d) rows *= x.size(d);
  std::vector<int64_t> out(rows);
  std::vector<int64_t> idx(nd, 0);  // odometer over the leading dims, row-major
  int64_t off = 0;
  for (int64_t r = 0; r < rows; ++r) {
    out[r] = off;
    for (int64_t d = nd - 1; d >= 0; --d) {
      off += x.stride(d);
      if (++idx[d] < x.size(d)) break;
      off -= idx[d] * x.stride(d);
      idx[d] = 0;
    }
  }
  return out;
}

// What every kd_loss variant shares: the checked hyperparameters, each row's
// target code (-1: no CE, -2: ignored row, else the class) and the reduction.
struct LossSetup {
  Divergence div;
  Reduction red;
  std::vector<int64_t> target;  // empty without a target
  double gscale;                // 1 / the reduction's denominator (0 when no row is valid)
};

LossSetup setup_loss(const char* op, const at::Tensor& student, const std::optional<at::Tensor>& target_in,
                     double temperature, c10::string_view divergence, double beta, double alpha,
                     c10::string_view reduction, int64_t ignore_index) {
  LossSetup out{parse_divergence(divergence), parse_reduction(reduction), {}, 1.0};
  TORCH_CHECK_VALUE(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, op, ": beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, op, ": alpha must be in [0, 1], got ", alpha);
  const int64_t V = student.size(-1);
  const auto lead = student.sizes().slice(0, student.dim() - 1);
  const int64_t N = c10::multiply_integers(lead);
  const bool has_target = target_in.has_value() && target_in->defined();
  TORCH_CHECK_VALUE(alpha == 1.0 || has_target, op, ": alpha < 1 needs a target");
  int64_t n_valid = N;
  if (has_target) {
    const at::Tensor& tg = *target_in;
    TORCH_CHECK_VALUE(tg.sizes() == lead, op, ": target ", tg.sizes(), " must have the student's leading shape ", lead);
    TORCH_CHECK_TYPE(!at::isFloatingType(tg.scalar_type()) && !at::isComplexType(tg.scalar_type()), op,
                     ": target must be an integer tensor, got ", tg.scalar_type());
    const at::Tensor tg64 = tg.to(at::kLong).contiguous();
    const int64_t* tp = tg64.const_data_ptr<int64_t>();
    out.target.resize(N);
    n_valid = 0;
    for (int64_t r = 0; r < N; ++r) {
      if (tp[r] == ignore_index) {
        out.target[r] = -2;
        continue;
      }
      TORCH_CHECK_VALUE(tp[r] >= 0 && tp[r] < V, op, ": target[", r, "] = ", tp[r], " is outside [0, ", V,
                        ") and is not ignore_index (", ignore_index, ")");
      out.target[r] = alpha < 1.0 ? tp[r] : -1;
      ++n_valid;
    }
  }
  // Denominators, as documented in pycompress/functional.py.
  double denom = 1.0;
  if (out.red == Reduction::Mean) denom = static_cast<double>(n_valid);
  if (out.red == Reduction::BatchMean) {
    const double rows_per_entry = student.size(0) > 0 ? static_cast<double>(N) / student.size(0) : 1.0;
    denom = n_valid / rows_per_entry;
  }
  out.gscale = denom > 0 ? 1.0 / denom : 0.0;  // an all-ignored batch has loss 0, gradient 0
  return out;
}

template <typename acc_t>
RowParams<acc_t> row_params(const LossSetup& ls, double temperature, double beta, double alpha, bool t2_scale) {
  const bool mse = ls.div == Divergence::MSELogits;
  const double T = mse ? 1.0 : temperature;  // logit regression has no temperature
  RowParams<acc_t> p;
  p.inv_t = static_cast<acc_t>(1.0 / T);
  p.soft_coef = static_cast<acc_t>(alpha * ((t2_scale && !mse) ? T * T : 1.0));
  p.hard_coef = static_cast<acc_t>(1.0 - alpha);
  p.beta = static_cast<acc_t>(beta);
  p.need_ce = alpha < 1.0;
  p.t_is_one = T == 1.0;
  return p;
}

// Reduces row losses (summed in fp64, in row order: independent of the thread count).
at::Tensor reduce_rows(const std::vector<double>& row_loss, const LossSetup& ls, const at::Tensor& student) {
  if (ls.red == Reduction::None) {
    at::Tensor loss = at::empty({static_cast<int64_t>(row_loss.size())}, at::kDouble);
    std::copy(row_loss.begin(), row_loss.end(), loss.data_ptr<double>());
    return loss.to(student.scalar_type()).reshape(student.sizes().slice(0, student.dim() - 1));
  }
  double total = 0;
  for (double v : row_loss) total += v;
  return at::scalar_tensor(total * ls.gscale, student.options());
}

std::tuple<at::Tensor, at::Tensor> kd_loss_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                               const std::optional<at::Tensor>& target_in, double temperature,
                                               c10::string_view divergence, double beta, double alpha, bool t2_scale,
                                               c10::string_view reduction, int64_t ignore_index, bool compute_grad) {
  constexpr const char* op = "pycompress::kd_loss";
  TORCH_CHECK_VALUE(student_in.dim() >= 1 && student_in.size(-1) >= 1, op,
                    ": student must be (..., V) with V >= 1, got ", student_in.sizes());
  TORCH_CHECK_VALUE(student_in.sizes() == teacher_in.sizes(), op, ": student ", student_in.sizes(), " and teacher ",
                    teacher_in.sizes(), " must have the same shape");
  TORCH_CHECK_TYPE(student_in.scalar_type() == teacher_in.scalar_type(), op, ": student (",
                   student_in.scalar_type(), ") and teacher (", teacher_in.scalar_type(), ") must share a dtype");
  const LossSetup ls = setup_loss(op, student_in, target_in, temperature, divergence, beta, alpha, reduction,
                                  ignore_index);
  // Rows are addressed through offsets; only the class dim must be contiguous.
  const at::Tensor student = student_in.stride(-1) == 1 ? student_in : student_in.contiguous();
  const at::Tensor teacher = teacher_in.stride(-1) == 1 ? teacher_in : teacher_in.contiguous();
  const std::vector<int64_t> row_s = row_offsets(student), row_t = row_offsets(teacher);
  at::Tensor grad = compute_grad ? empty_hugepage(student.sizes(), student.options()) : at::Tensor();
  std::vector<double> row_loss(row_s.size());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_cpu", [&] {
    using acc_t = typename Io<scalar_t>::acc_t;
    const auto p = row_params<acc_t>(ls, temperature, beta, alpha, t2_scale);
    const int64_t* tp = ls.target.empty() ? nullptr : ls.target.data();
    const auto gs = static_cast<acc_t>(ls.gscale);
    switch (ls.div) {
      case Divergence::ForwardKL:
        kd_rows<Divergence::ForwardKL, scalar_t>(student, teacher, row_s.data(), row_t.data(), tp, grad, gs, p, row_loss);
        break;
      case Divergence::ReverseKL:
        kd_rows<Divergence::ReverseKL, scalar_t>(student, teacher, row_s.data(), row_t.data(), tp, grad, gs, p, row_loss);
        break;
      case Divergence::JSD:
        kd_rows<Divergence::JSD, scalar_t>(student, teacher, row_s.data(), row_t.data(), tp, grad, gs, p, row_loss);
        break;
      case Divergence::MSELogits:
        kd_rows<Divergence::MSELogits, scalar_t>(student, teacher, row_s.data(), row_t.data(), tp, grad, gs, p, row_loss);
        break;
    }
  });
  return {reduce_rows(row_loss, ls, student), compute_grad ? grad : at::empty({0}, student.options())};
}

// The dense kernel's compute floor: its exponentials alone, 2^(c2 x - shift) of every element of
// student and teacher, widened from the input dtype as the kernel's exp loop does, but re-read
// from one L1-resident chunk instead of DRAM. bench/bench_kd_loss.py times it like the memory
// roofline. Returns the sum of the exps (so that none is optimised away), in fp64.
at::Tensor kd_loss_exp_floor_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature) {
  constexpr const char* op = "pycompress::_kd_loss_exp_floor";
  TORCH_CHECK_VALUE(student.dim() >= 1 && student.size(-1) >= 1 && student.sizes() == teacher.sizes(), op,
                    ": student and teacher must be (..., V) of one shape with V >= 1, got ", student.sizes(), " and ",
                    teacher.sizes());
  TORCH_CHECK_TYPE(student.scalar_type() == teacher.scalar_type(), op, ": student and teacher must share a dtype");
  TORCH_CHECK_VALUE(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  const int64_t V = student.size(-1), N = student.numel() / V;
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_exp_floor", [&] {
    using IO = Io<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = Vectorized<acc_t>;
    constexpr int64_t W = Vec::size();
    const int64_t n = std::min(V, kChunk);
    // The first chunk of row 0, contiguous (student may be a strided view).
    const at::Tensor s0 = student.reshape({N, V}).select(0, 0).narrow(0, 0, n).contiguous();
    const at::Tensor t0 = teacher.reshape({N, V}).select(0, 0).narrow(0, 0, n).contiguous();
    const scalar_t* s = s0.const_data_ptr<scalar_t>();
    const scalar_t* t = t0.const_data_ptr<scalar_t>();
    const Vec vc2(static_cast<acc_t>(1.44269504088896341 / temperature)), vshift(0);
    std::vector<double> row_sum(N);
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        Vec acc(0);
        for (int64_t j0 = 0; j0 < V; j0 += n) {
          for_chunks<W>(std::min(n, V - j0), [&](int64_t j, int64_t nn) {
            acc += keep(fast_exp2(at::vec::fmsub(IO::load(s + j, nn), vc2, vshift)), nn, acc_t(0));
            acc += keep(fast_exp2(at::vec::fmsub(IO::load(t + j, nn), vc2, vshift)), nn, acc_t(0));
          });
        }
        row_sum[r] = at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, acc);
      }
    });
    for (double v : row_sum) total += v;
  });
  return at::scalar_tensor(total, at::kDouble);
}

// ---------------------------------------------------------------------------------------------
// Sparse (top-k) teacher. The teacher row is k (value, index) pairs; the divergence is taken
// between bucket distributions (b = each top-k class, plus the tail in "bucket" mode):
//   bucket  values are teacher log-probabilities at T = 1; the remaining mass 1 - sum exp(v)
//           forms one tail bucket. Teacher buckets are tempered as k + 1 classes (the tail
//           as one class), softmax(u / T) with u = (v, log tail). The student's buckets are
//           its full tempered softmax Q, summed over the tail classes.
//   drop    the tail is discarded: both distributions are renormalised over the k classes
//           (values may then be logits or log-probabilities alike).
// With k = V both equal the dense loss. Gradient: dD/dx_j = q_j h_b(j) for the bucket b(j) of
// class j, with h_b the same per-bucket factors as the dense formulas (e.g. 1 - P_b / Q_b for
// forward KL); in drop mode classes outside the top-k get none. mse_logits regresses the k
// given logits only. Cost: the dense kernel's passes over the student row, plus O(k).
enum class Tail { Bucket, Drop };

template <typename acc_t>
struct Buckets {  // per-thread scratch of size k + 1
  std::vector<acc_t> lq, lp, h;
};

template <typename scalar_t>
typename Io<scalar_t>::acc_t kd_topk_row(
    const scalar_t* s, int64_t V, const typename Io<scalar_t>::acc_t* tv, const int64_t* ti, int64_t k, Tail tail,
    Divergence D, int64_t target, scalar_t* g, typename Io<scalar_t>::acc_t gscale,
    const RowParams<typename Io<scalar_t>::acc_t>& p, typename Io<scalar_t>::acc_t* es,
    typename Io<scalar_t>::acc_t* mark, Buckets<typename Io<scalar_t>::acc_t>& bk, int64_t row) {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const bool need_ce = p.need_ce && target >= 0;
  // With k = V there is no tail class: the bucket reading reduces to the k classes.
  const bool bucket = tail == Tail::Bucket && D != Divergence::MSELogits && k < V;

  for (int64_t i = 0; i < k; ++i) {
    const int64_t c = ti[i];
    TORCH_CHECK_VALUE(c >= 0 && c < V, "pycompress::kd_loss_topk: teacher index ", c, " in row ", row,
                      " is outside [0, ", V, ")");
    TORCH_CHECK_VALUE(mark[c] == 0, "pycompress::kd_loss_topk: teacher index ", c, " appears twice in row ", row);
    mark[c] = 1;
  }
  // Passes over the student row: max, then exps (stored) with their total and tail sums.
  acc_t ms = kNegInf, zs = 0, ztail = 0, z1 = 0;
  const bool full_pass = bucket || need_ce;
  if (full_pass) {
    Vec vm(kNegInf);
    for_chunks<W>(V, [&](int64_t j, int64_t n) { vm = at::vec::maximum(vm, keep(IO::load(s + j, n), n, kNegInf)); });
    ms = hmax(vm);
    const Vec vit(p.inv_t), vmx(ms * p.inv_t), vms(ms), one(1);
    RowSum<acc_t> vz, vt, v1;
    for_chunks_summed<W>(V, [&](int64_t j, int64_t n) {
      const Vec sv = IO::load(s + j, n);
      const Vec e = keep(fast_exp(sv * vit - vmx), n, acc_t(0));
      e.store(es + j);
      vz += e;
      vt += e * (one - Vec::loadu(mark + j));
      if (need_ce && !p.t_is_one) v1 += keep(fast_exp(sv - vms), n, acc_t(0));
    }, vz, vt, v1);
    zs = static_cast<acc_t>(vz.total);
    ztail = static_cast<acc_t>(vt.total);
    z1 = p.t_is_one ? zs : static_cast<acc_t>(v1.total);
  }
  const acc_t lzs = std::log(zs), mx = ms * p.inv_t;

  // Bucket log-probabilities: lq (student), lp (teacher); K = k (+ 1 tail bucket).
  const int64_t K = bucket ? k + 1 : k;
  auto& lq = bk.lq;
  auto& lp = bk.lp;
  auto& h = bk.h;
  acc_t div = 0;
  if (D == Divergence::MSELogits) {
    for (int64_t i = 0; i < k; ++i) {
      const acc_t d = static_cast<acc_t>(s[ti[i]]) - tv[i];
      div += acc_t(0.5) * d * d;
      h[i] = d;
    }
  } else {
    acc_t tmax = kNegInf;
    acc_t tmass = 0;
    for (int64_t i = 0; i < k; ++i) {
      lp[i] = tv[i] * p.inv_t;
      tmax = std::max(tmax, lp[i]);
      if (bucket) tmass += std::exp(tv[i]);
    }
    if (bucket) {
      TORCH_CHECK_VALUE(tmass <= acc_t(1.001), "pycompress::kd_loss_topk: with tail='bucket' the teacher values "
                        "must be log-probabilities (log_softmax at T = 1), but row ", row, " sums to ", tmass, " > 1");
      lp[k] = std::log(std::max(acc_t(1) - tmass, acc_t(0))) * p.inv_t;
      tmax = std::max(tmax, lp[k]);
    }
    acc_t tz = 0;
    for (int64_t b = 0; b < K; ++b) tz += std::exp(lp[b] - tmax);
    const acc_t tlse = tmax + std::log(tz);
    for (int64_t b = 0; b < K; ++b) lp[b] -= tlse;
    if (bucket) {
      for (int64_t i = 0; i < k; ++i) lq[i] = static_cast<acc_t>(s[ti[i]]) * p.inv_t - mx - lzs;
      lq[k] = std::log(ztail) - lzs;
    } else {  // drop: the student renormalised over the top-k classes
      acc_t qmax = kNegInf, qz = 0;
      for (int64_t i = 0; i < k; ++i) qmax = std::max(qmax, lq[i] = static_cast<acc_t>(s[ti[i]]) * p.inv_t);
      for (int64_t i = 0; i < k; ++i) qz += std::exp(lq[i] - qmax);
      const acc_t qlse = qmax + std::log(qz);
      for (int64_t i = 0; i < k; ++i) lq[i] -= qlse;
    }
    // h_b: d(divergence)/d(x_j) = q_j * h_b(j) for reverse KL and JSD. Forward KL's
    // h_b = 1 - P_b/Q_b is applied as q_j - P_b q_j/Q_b below, so no P/Q can overflow.
    acc_t kl_qm = 0;
    for (int64_t b = 0; b < K; ++b) {
      const acc_t P = std::exp(lp[b]), Q = std::exp(lq[b]);
      if (D == Divergence::ForwardKL) {
        if (P > 0) div += P * (lp[b] - lq[b]);
      } else if (D == Divergence::ReverseKL) {
        if (Q > 0) div += Q * (lq[b] - lp[b]);
      } else {
        const acc_t M = p.beta * P + (acc_t(1) - p.beta) * Q;
        const acc_t lm = std::log(M);
        if (P > 0) div += p.beta * P * (lp[b] - lm);
        const acc_t tq = Q > 0 ? Q * (lq[b] - lm) : acc_t(0);
        div += (acc_t(1) - p.beta) * tq;
        kl_qm += tq;
        h[b] = Q > 0 ? lq[b] - lm : acc_t(0);
      }
    }
    for (int64_t b = 0; b < K; ++b) {
      if (D == Divergence::ReverseKL) h[b] = lq[b] - lp[b] - div;
      if (D == Divergence::JSD) h[b] = (acc_t(1) - p.beta) * (h[b] - kl_qm);
    }
  }
  const acc_t ce = need_ce ? (p.t_is_one ? mx + lzs : ms + std::log(z1)) - static_cast<acc_t>(s[target]) : acc_t(0);
  const acc_t loss = p.soft_coef * div + (need_ce ? p.hard_coef * ce : acc_t(0));

  if (g) {
    // Every class: its tail-bucket term (bucket mode) and the CE term; then the top-k classes.
    const acc_t gsoft = p.soft_coef * (D == Divergence::MSELogits ? acc_t(1) : p.inv_t) * gscale;
    const acc_t izs = acc_t(1) / zs, iz1 = acc_t(1) / z1;
    // Tail classes: q_j h_tail; forward KL's h_tail = 1 - P/Q is taken as (1 - P/Q) on the
    // tail's total, i.e. q_j - P_tail * e_j / ztail.
    acc_t c_tail = 0;
    if (bucket) {
      c_tail = D == Divergence::ForwardKL ? izs - std::exp(lp[k]) / ztail : izs * h[k];
      if (!(ztail > 0)) c_tail = 0;  // no tail class exists (k = V) or all underflowed
    }
    const Vec vct(gsoft * c_tail), vgh(p.hard_coef * gscale), vizs(izs), viz1(iz1), vms(ms);
    for_chunks<W>(V, [&](int64_t j, int64_t n) {
      Vec gv(0);
      if (bucket) gv = vct * Vec::loadu(es + j);
      if (need_ce) gv += vgh * (p.t_is_one ? Vec::loadu(es + j) * vizs : fast_exp(IO::load(s + j, n) - vms) * viz1);
      IO::store(g + j, gv, n);  // not streamed: the top-k entries are rewritten below
    });
    for (int64_t i = 0; i < k; ++i) {
      const int64_t c = ti[i];
      acc_t soft;
      if (D == Divergence::MSELogits) {
        soft = h[i];
      } else {
        const acc_t q = std::exp(lq[i]);  // bucket mode: q_c; drop mode: renormalised q_c
        soft = D == Divergence::ForwardKL ? q - std::exp(lp[i]) : q * h[i];
      }
      acc_t gc = gsoft * soft;
      if (need_ce) gc += p.hard_coef * gscale * (p.t_is_one ? es[c] * izs : std::exp(static_cast<acc_t>(s[c]) - ms) * iz1);
      g[c] = static_cast<scalar_t>(gc);
    }
    if (need_ce) g[target] = static_cast<scalar_t>(static_cast<acc_t>(g[target]) - p.hard_coef * gscale);
  }
  for (int64_t i = 0; i < k; ++i) mark[ti[i]] = 0;
  return loss;
}

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_cpu(
    const at::Tensor& student_in, const at::Tensor& values_in, const at::Tensor& indices_in,
    const std::optional<at::Tensor>& target_in, double temperature, c10::string_view divergence, double beta,
    double alpha, bool t2_scale, c10::string_view reduction, int64_t ignore_index, c10::string_view tail_name,
    bool compute_grad) {
  constexpr const char* op = "pycompress::kd_loss_topk";
  TORCH_CHECK_VALUE(student_in.dim() >= 1 && student_in.size(-1) >= 1, op,
                    ": student must be (..., V) with V >= 1, got ", student_in.sizes());
  const auto lead = student_in.sizes().slice(0, student_in.dim() - 1);
  TORCH_CHECK_VALUE(values_in.dim() == student_in.dim() && values_in.sizes().slice(0, values_in.dim() - 1) == lead,
                    op, ": teacher values ", values_in.sizes(), " must be (", lead, ", k)");
  TORCH_CHECK_VALUE(indices_in.sizes() == values_in.sizes(), op, ": teacher indices ", indices_in.sizes(),
                    " must match the values ", values_in.sizes());
  const int64_t V = student_in.size(-1), k = values_in.size(-1);
  TORCH_CHECK_VALUE(k >= 1 && k <= V, op, ": k = ", k, " must be in [1, V = ", V, "]");
  TORCH_CHECK_TYPE(at::isFloatingType(values_in.scalar_type()), op, ": teacher values must be floating point, got ",
                   values_in.scalar_type());
  TORCH_CHECK_TYPE(indices_in.scalar_type() == at::kLong, op, ": teacher indices must be int64, got ",
                   indices_in.scalar_type());
  TORCH_CHECK_VALUE(tail_name == "bucket" || tail_name == "drop", op, ": tail must be 'bucket' or 'drop', got '",
                    tail_name, "'");
  const Tail tail = tail_name == "bucket" ? Tail::Bucket : Tail::Drop;
  const LossSetup ls = setup_loss(op, student_in, target_in, temperature, divergence, beta, alpha, reduction,
                                  ignore_index);
  const at::Tensor student = student_in.stride(-1) == 1 ? student_in : student_in.contiguous();
  const std::vector<int64_t> row_s = row_offsets(student);
  const int64_t N = static_cast<int64_t>(row_s.size());
  const at::Tensor indices = indices_in.reshape({N, k}).contiguous();
  at::Tensor grad = compute_grad ? empty_hugepage(student.sizes(), student.options()) : at::Tensor();
  std::vector<double> row_loss(N);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_topk_cpu", [&] {
    using acc_t = typename Io<scalar_t>::acc_t;
    constexpr int64_t W = Vectorized<acc_t>::size();
    const auto p = row_params<acc_t>(ls, temperature, beta, alpha, t2_scale);
    const at::Tensor values = values_in.reshape({N, k}).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* tv = values.const_data_ptr<acc_t>();
    const int64_t* ti = indices.const_data_ptr<int64_t>();
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    scalar_t* g = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const auto gs = static_cast<acc_t>(ls.gscale);
    const int64_t Vpad = (V + W - 1) / W * W;
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / V), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> es(Vpad), mark(Vpad, acc_t(0));
      Buckets<acc_t> bk{std::vector<acc_t>(k + 1), std::vector<acc_t>(k + 1), std::vector<acc_t>(k + 1)};
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* g_row = g ? g + r * V : nullptr;
        const int64_t y = ls.target.empty() ? -1 : ls.target[r];
        if (y == -2) {
          row_loss[r] = 0;
          if (g_row) std::fill(g_row, g_row + V, scalar_t(0));
          continue;
        }
        row_loss[r] = kd_topk_row<scalar_t>(s + row_s[r], V, tv + r * k, ti + r * k, k, tail, ls.div, y, g_row, gs, p,
                                            es.data(), mark.data(), bk, r);
      }
    });
  });
  return {reduce_rows(row_loss, ls, student), compute_grad ? grad : at::empty({0}, student.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("kd_loss", &kd_loss_cpu);
  m.impl("kd_loss_topk", &kd_loss_topk_cpu);
  m.impl("_kd_loss_exp_floor", &kd_loss_exp_floor_cpu);
}

}  // namespace pycompress
