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
// Passes over a row (rows in parallel, at::parallel_for):
//   1. max of s and t: the only pass that streams s and t from DRAM;
//   2. e_s = exp(x - max x), e_t = exp(y - max y) into a per-thread scratch row,
//      with their sums: every exponential is computed exactly once. This pass
//      also prefetches the next row, hiding pass 1's DRAM latency behind exps;
//   3. the gradient from the scratch rows (s and t re-read from L2), written once.
// Memory traffic: reads 2*N*V*sizeof(scalar), writes N*V*sizeof(scalar) for the
// gradient; nothing else of size N*V exists. At V = 32k in fp32, a row's s, t,
// scratch and gradient (640 KiB) stay inside the 2 MiB L2.
// Numerics: fp32 accumulation for fp32/bf16/fp16 (fp64 for fp64), max-shifted
// exponentials, log-probabilities taken from logits (never the log of an
// underflowed exp), and row losses summed in fp64 in row order, so the result
// does not depend on the thread count. NaN/Inf in a row propagate as NaN.
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
#if defined(CPU_CAPABILITY_AVX512)
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
  // each line's read-for-ownership and does not evict the row's working set.
  static void store_stream(scalar_t* p, const Vec& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (n == Vec::size() && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
        _mm512_stream_ps(p, v);
        return;
      }
    }
#endif
    VecIo<scalar_t>::store(p, v, n);
  }
};

template <typename Vec>
inline Vec fast_exp(const Vec& v) {
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    return v.exp_u20();  // ~1e-6 relative, several times faster than Sleef's u10
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
inline acc_t hsum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, v);
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
    Vec vz(0);
    for_chunks<W>(V, [&](int64_t j, int64_t n) { vz += keep(fast_exp(IO::load(s + j, n) - Vec(ms)), n, acc_t(0)); });
    lz1 = std::log(hsum(vz));
  }
  const acc_t iz1 = need_ce ? std::exp(-lz1) : acc_t(0);
  Vec vsq(0);
  const Vec half(0.5), gsoft(p.soft_coef * gscale), ghard(p.hard_coef * gscale);
  for_chunks<W>(V, [&](int64_t j, int64_t n) {
    const Vec xs = IO::load(s + j, n);
    const Vec d = xs - IO::load(t + j, n);
    vsq += keep(half * d * d, n, acc_t(0));
    if (g) {
      Vec gv = gsoft * d;
      if (need_ce) gv = subtract_at_target(gv + ghard * fast_exp(xs - Vec(ms)) * Vec(iz1), target, j, n,
                                           p.hard_coef * gscale);
      IO::store_stream(g + j, gv, n);
    }
  });
  acc_t loss = p.soft_coef * hsum(vsq);
  if (need_ce) loss += p.hard_coef * (ms + lz1 - static_cast<acc_t>(s[target]));
  return loss;
}

// One row: returns the row loss and, when g != nullptr, writes gscale * d(loss)/ds.
// es and et are scratch rows of at least V (rounded up to the vector width).
template <Divergence D, typename scalar_t>
typename Io<scalar_t>::acc_t kd_row(
    const scalar_t* s, const scalar_t* t, int64_t V, int64_t target, scalar_t* g,
    typename Io<scalar_t>::acc_t gscale, const RowParams<typename Io<scalar_t>::acc_t>& p,
    typename Io<scalar_t>::acc_t* es, typename Io<scalar_t>::acc_t* et, const scalar_t* next_s,
    const scalar_t* next_t) {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const bool need_ce = p.need_ce && target >= 0;

  if constexpr (D == Divergence::MSELogits) {
    return kd_row_mse(s, t, V, target, need_ce, g, gscale, p);
  } else {
    // Pass 1: maxima (NaN-propagating, so a NaN row ends as NaN).
    Vec vms(kNegInf), vmt(kNegInf);
    for_chunks<W>(V, [&](int64_t j, int64_t n) {
      vms = at::vec::maximum(vms, keep(IO::load(s + j, n), n, kNegInf));
      vmt = at::vec::maximum(vmt, keep(IO::load(t + j, n), n, kNegInf));
    });
    const acc_t ms = hmax(vms), mt = hmax(vmt);
    const acc_t mx = ms * p.inv_t, my = mt * p.inv_t;
    const bool ce_extra = need_ce && !p.t_is_one;

    // Pass 2: exponentials once, into scratch; their sums; the KL's cross term.
    const Vec vit(p.inv_t), vmx(mx), vmy(my), vms1(ms);
    Vec vzs(0), vzt(0), va(0), vz1(0);
    for_chunks<W>(V, [&](int64_t j, int64_t n) {
      // Pass 2 is compute-bound: pull the next row into cache meanwhile, so that
      // its pass 1 (the only DRAM-bound pass) overlaps with this row's exps.
      if (next_s) {
        __builtin_prefetch(next_s + j);
        __builtin_prefetch(next_t + j);
      }
      const Vec sv = IO::load(s + j, n);
      const Vec x = sv * vit - vmx;
      const Vec y = IO::load(t + j, n) * vit - vmy;
      const Vec e_s = keep(fast_exp(x), n, acc_t(0));
      const Vec e_t = keep(fast_exp(y), n, acc_t(0));
      e_s.store(es + j);
      e_t.store(et + j);
      vzs += e_s;
      vzt += e_t;
      if constexpr (D == Divergence::ForwardKL) va += e_t * (y - x);
      if constexpr (D == Divergence::ReverseKL) va += e_s * (x - y);
      if (ce_extra) vz1 += keep(fast_exp(sv - vms1), n, acc_t(0));
    });
    const acc_t zs = hsum(vzs), zt = hsum(vzt);
    const acc_t lzs = std::log(zs), lzt = std::log(zt);
    const acc_t izs = acc_t(1) / zs, izt = acc_t(1) / zt;
    const acc_t lz1 = ce_extra ? std::log(hsum(vz1)) : lzs;
    const acc_t iz1 = ce_extra ? std::exp(-lz1) : izs;
    // Cross-entropy at T = 1: lse(s) - s[target].
    const acc_t ce = need_ce ? (p.t_is_one ? mx + lzs : ms + lz1) - static_cast<acc_t>(s[target]) : acc_t(0);

    acc_t div = 0;
    if constexpr (D == Divergence::ForwardKL) div = hsum(va) * izt + lzs - lzt;
    if constexpr (D == Divergence::ReverseKL) div = hsum(va) * izs + lzt - lzs;
    acc_t kl_qm = 0;  // JSD: KL(Q||M), needed by the gradient
    if constexpr (D == Divergence::JSD) {
      // JSD needs normalised P and Q, so its log terms wait for pass 2's sums.
      // Zero-probability entries contribute 0 (0 log 0 = 0), also where M = 0.
      // et is overwritten with log(Q/M) (0 where Q = 0) for the gradient.
      const Vec b(p.beta), b1(acc_t(1) - p.beta), vizs(izs), vizt(izt), vlzs(lzs), vlzt(lzt), zero(0);
      Vec vj(0), vk(0);
      for_chunks<W>(V, [&](int64_t j, int64_t n) {
        const Vec q = Vec::loadu(es + j) * vizs;
        const Vec pt = Vec::loadu(et + j) * vizt;
        const Vec log_m = (b * pt + b1 * q).log();
        const Vec log_q = IO::load(s + j, n) * vit - vmx - vlzs;
        const Vec log_p = IO::load(t + j, n) * vit - vmy - vlzt;
        const Vec r = Vec::blendv(log_q - log_m, zero, q == zero);
        const Vec tq = q * r;
        const Vec tp = Vec::blendv(pt * (log_p - log_m), zero, pt == zero);
        vj += b * tp + b1 * tq;
        vk += tq;
        r.store(et + j);
      });
      div = hsum(vj);
      kl_qm = hsum(vk);
    }
    const acc_t loss = p.soft_coef * div + (need_ce ? p.hard_coef * ce : acc_t(0));
    if (!g) return loss;

    // Pass 3: the gradient, written once.
    const acc_t gsoft = p.soft_coef * p.inv_t * gscale;
    const Vec vgs(gsoft), vgh(p.hard_coef * gscale), vizs(izs), vizt(izt), viz1(iz1);
    for_chunks<W>(V, [&](int64_t j, int64_t n) {
      const Vec q = Vec::loadu(es + j) * vizs;
      Vec gv;
      if constexpr (D == Divergence::ForwardKL) {
        gv = vgs * (q - Vec::loadu(et + j) * vizt);
      } else if constexpr (D == Divergence::ReverseKL) {
        const Vec log_ratio = (IO::load(s + j, n) - IO::load(t + j, n)) * vit - Vec(mx - my + lzs - lzt);
        gv = vgs * q * (log_ratio - Vec(div));
      } else {  // JSD
        gv = Vec(gsoft * (acc_t(1) - p.beta)) * q * (Vec::loadu(et + j) - Vec(kl_qm));
      }
      if (need_ce) {
        const Vec soft1 = p.t_is_one ? q : fast_exp(IO::load(s + j, n) - vms1) * viz1;
        gv = subtract_at_target(gv + vgh * soft1, target, j, n, p.hard_coef * gscale);
      }
      IO::store_stream(g + j, gv, n);
    });
    return loss;
  }
}

template <Divergence D, typename scalar_t>
void kd_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* row_s, const int64_t* row_t,
             const int64_t* target, at::Tensor& grad, typename Io<scalar_t>::acc_t gscale,
             const RowParams<typename Io<scalar_t>::acc_t>& p, std::vector<double>& row_loss) {
  using acc_t = typename Io<scalar_t>::acc_t;
  constexpr int64_t W = Vectorized<acc_t>::size();
  const int64_t N = static_cast<int64_t>(row_loss.size());
  const int64_t V = student.size(-1);
  const int64_t Vpad = (V + W - 1) / W * W;
  const scalar_t* s = student.const_data_ptr<scalar_t>();
  const scalar_t* t = teacher.const_data_ptr<scalar_t>();
  scalar_t* g = grad.defined() ? grad.data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / V);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(D == Divergence::MSELogits ? 0 : 2 * Vpad);
    acc_t* es = scratch.data();
    acc_t* et = es + Vpad;
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* g_row = g ? g + r * V : nullptr;
      const int64_t y = target ? target[r] : -1;
      if (y == -2) {  // ignored row: no loss, no gradient
        row_loss[r] = 0;
        if (g_row) std::fill(g_row, g_row + V, scalar_t(0));
        continue;
      }
      const bool has_next = r + 1 < end;
      row_loss[r] = kd_row<D, scalar_t>(s + row_s[r], t + row_t[r], V, y, g_row, gscale, p, es, et,
                                        has_next ? s + row_s[r + 1] : nullptr, has_next ? t + row_t[r + 1] : nullptr);
    }
#if defined(CPU_CAPABILITY_AVX512)
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
    Vec vz(0), vt(0), v1(0);
    for_chunks<W>(V, [&](int64_t j, int64_t n) {
      const Vec sv = IO::load(s + j, n);
      const Vec e = keep(fast_exp(sv * vit - vmx), n, acc_t(0));
      e.store(es + j);
      vz += e;
      vt += e * (one - Vec::loadu(mark + j));
      if (need_ce && !p.t_is_one) v1 += keep(fast_exp(sv - vms), n, acc_t(0));
    });
    zs = hsum(vz);
    ztail = hsum(vt);
    z1 = p.t_is_one ? zs : hsum(v1);
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
}

}  // namespace pycompress
