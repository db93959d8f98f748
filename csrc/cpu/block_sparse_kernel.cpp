// Block-sparse (BSR) 2-D convolution, CPU kernel.
//
// The conv is the GEMM out[co, p] = sum_k W[co, k] * col[k, p], k = (ci, r, s)
// in PyTorch's weight order, p an output pixel. W is BSR with (bo x bk) blocks;
// only nonzero blocks are multiplied. Column row k of col is read from a
// "source" buffer at a per-k offset, so one micro-kernel serves two layouts:
//   direct   1x1, stride 1, no padding, at least one strip per image: the
//            NCHW input itself (q = pixel); an image's last strip is moved
//            back to end at its last pixel, so nothing past the input is read;
//   phases   otherwise: the input copied once into zero-padded planes, split
//            into sh*sw phase planes of (Hq, Wq) when strided. With
//            q = oh * Wq + ow, tap (r, s) of channel c is the contiguous run
//            at phase ((r*dh)%sh, (s*dw)%sw) of c, row (r*dh)/sh, column
//            (s*dw)/sw (implicit GEMM: no im2col, no strided loads). Lanes
//            with ow >= OW are computed and dropped (Wq/OW extra work).
// Micro-kernel: a tile of MR = 4 output channels x NV vectors of q kept in
// accumulator registers: NV = 6 with AVX-512 (16 fp32 lanes; 8 x 3 for 1x1),
// NV = 3 with AVX2 (8 lanes, 16 registers). Every nonzero weight is broadcast
// and FMA'd against the NV input vectors, in one flat loop over the block row's
// nonzero k. The last strip of an image uses only the vectors it needs. Values
// are stored k-major inside a block so the MR broadcasts of one k are
// contiguous. Tiles (image, q strip, block row) are split over threads with
// at::parallel_for. The store is the epilogue: + bias, + residual (a ResNet
// shortcut of the output's shape), then ReLU or LeakyReLU.
// Fused p x p max-pooling (pool = p, stride p): a tile is then the p conv rows
// of one pooled row (strips of NV vectors over their q range, always read
// from the padded copy, whose slack absorbs the last strip's overrun), summed
// into a per-thread buffer and pooled there before the store, so the unpooled
// output never reaches memory. The bias and the activation come after the max:
// both are monotone per channel, so they commute with it.
// Padded layouts (out_padding = q): the output is written into planes with q-pixel
// zero borders (each row's borders with the row), and a stride-1 conv of padding q
// whose input is such a layout reads it in place as its phase plane, after
// checking the borders are zero, instead of copying it. Input, residual and
// output planes may be strided; only pixels within a row must be contiguous.
// Memory traffic per call: the input once (plus one padded copy, unless it is a
// padded layout), nonzero weights once per q strip (from L2), the residual once,
// the (pooled) output once.
// Scratch buffers are cached per thread and reused, and outputs are recycled
// through the huge-page allocator's activations cache, so a steady inference
// loop takes no fresh page faults.
// Numerics: fp32 FMA accumulation in block order; no reassociation across
// calls, so results do not depend on the thread count. The residual is added
// in fp32 after the bias (one rounding less than a separate add). bf16/fp16 inputs are
// widened to fp32 in the padded copy (so they never take the direct path) and
// the result is rounded once, in the store, to the input's dtype. Exception,
// on AVX512-BF16 builds: bf16 1x1 convs interleave channel pairs instead and
// multiply bf16 pairs with vdpbf16ps (weights rounded to bf16 per call, fp32
// sums), twice the k per instruction.
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/functional_bfloat16.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/bf16_dot.h"
#include "cpu/hugepage_alloc.h"

namespace pycompress {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
// Micro-tile: 4 output channels x kNV vectors of q, sized to the register file.
// AVX-512 (32 zmm): kNV = 6, 24 accumulators + 6 input vectors + 1 broadcast =
// 31 registers. Measured on a Zen 4, 1 thread, 50 % sparsity: 4 x 6 reaches
// ~200 GFLOP/s of nonzero work against ~150 for 4 x 4, ~140 for 8 x 2, ~130 for
// 16 x 1 and 4 x 7 (which spills): fewer broadcasts and loads per FMA.
// AVX2 (16 ymm, no broadcast operand in the FMA): kNV = 3, 12 accumulators + 3
// inputs + 1 broadcast = 16; the AVX-512 tile would spill most accumulators.
#ifdef CPU_CAPABILITY_AVX512
constexpr int kNV = 6;
constexpr bool kTallTiles = true;  // 8 x 3 for 1x1 convs (see block_sparse_conv2d_cpu)
#else
constexpr int kNV = 3;
constexpr bool kTallTiles = false;  // 8 x 3 needs 24 accumulators
#endif
constexpr int64_t kStrip = kNV * kW;
constexpr int64_t kChunksPerThread = 8;  // work-sharing granularity of conv_tiles

// Grows-only per-thread scratch: reused across calls (no page faults after the first).
float* scratch(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// dst[0:n] = src[0:n], widening bf16/fp16 to fp32 or rounding fp32 to them
// where the types differ, with (masked) vector moves: the rows copied here are
// 7-60 elements, where a memcpy call (or at::vec::convert's scalar tail)
// costs more than the copy.
template <typename D, typename S>
inline void copy_n(D* dst, const S* src, int64_t n) {
  if constexpr (std::is_same_v<D, S>) {
    int64_t i = 0;
    for (; i + kW <= n; i += kW) Vec::loadu(src + i).store(dst + i);
    if (i < n) Vec::loadu(src + i, n - i).store(dst + i, n - i);
  } else if constexpr (std::is_same_v<D, float>) {  // widen: 2 fp32 vectors per reduced vector
    for (int64_t i = 0; i < n; i += 2 * kW) {
      const int64_t m = std::min<int64_t>(n - i, 2 * kW);
      auto [lo, hi] = at::vec::convert_to_float<S>(at::vec::Vectorized<S>::loadu(src + i, m));
      lo.store(dst + i, std::min<int64_t>(m, kW));
      if (m > kW) hi.store(dst + i + kW, m - kW);
    }
  } else {  // round to the reduced type
    for (int64_t i = 0; i < n; i += 2 * kW) {
      const int64_t m = std::min<int64_t>(n - i, 2 * kW);
      const Vec lo = Vec::loadu(src + i, std::min<int64_t>(m, kW));
      const Vec hi = m > kW ? Vec::loadu(src + i + kW, m - kW) : Vec(0.f);
      at::vec::convert_from_float<D>(lo, hi).store(dst + i, m);
    }
  }
}

// Where the column rows come from and how q maps to output pixels.
struct Source {
  const float* data;
  int64_t img_stride;    // elements between source images
  int64_t n_img;         // source images (N)
  int64_t img_q;         // q positions per source image (rows of wq)
  int64_t wq;            // q-row width
  int64_t ow;            // valid lanes at the start of each q-row (output width)
  std::vector<int64_t> off;  // per k: offset of column row k inside an image
  // The caller's own input (1x1 direct mode): nothing past an image's last q
  // may be read, so the last strip of an image ends there instead of starting
  // at a strip boundary (it overlaps the previous strip and stores only its
  // new lanes). Padded copies end in slack instead.
  bool exact_end = false;
};

// One step of the micro-kernel: acc[i][j] += w[i] * x[j*kW ...], fp32 (one k).
struct Fp32Fma {
  template <int MR, int NV>
  static inline void step(Vec (&acc)[MR][NV], const float* xk, const float* w) {
    Vec xv[NV];
    for (int j = 0; j < NV; ++j) xv[j] = Vec::loadu(xk + j * kW);
    for (int i = 0; i < MR; ++i) {
      const Vec wi(w[i]);
      for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(wi, xv[j], acc[i][j]);
    }
  }
};

#ifdef PYCOMPRESS_BF16_DOT
// Two k at once for bf16 1x1 convs: every 32-bit element of the source and of w
// is a bf16 pair (k even in the low half, k + 1 in the high half), and vdpbf16ps
// adds both products to the fp32 accumulator: half the instructions per k.
struct Bf16PairDot {
  template <int MR, int NV>
  static inline void step(Vec (&acc)[MR][NV], const float* xk, const float* w) {
    __m512i xv[NV];
    for (int j = 0; j < NV; ++j) xv[j] = _mm512_loadu_si512(xk + j * kW);
    const int32_t* wp = reinterpret_cast<const int32_t*>(w);
    for (int i = 0; i < MR; ++i) {
      const __m512bh wi = (__m512bh)_mm512_set1_epi32(wp[i]);
      for (int j = 0; j < NV; ++j) acc[i][j] = Vec(_mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[j], wi));
    }
  }
};
#endif

// acc[i][j] = the sum of the `steps` nonzero steps of block row r (Step::step each): one
// flat loop over the block row's nonzero columns, so the accumulators stay in
// registers (a loop over blocks around a loop over k made GCC spill them at
// every block boundary).
// Out of line on purpose: its loop needs every vector register (AVX2: 12 accumulators, 3 inputs,
// a broadcast), and inlined into a tile function GCC kept one more value live and spilled two
// accumulators into memory inside the loop (the 64-channel 3x3 layer 40 % slower). The loop runs on
// a local tile, copied out at the end: acc itself may alias the inputs (vector types are
// may_alias), which would make GCC store it back at every step.
template <int MR, int NV, class Step>
C10_NOINLINE void accumulate(Vec (&acc)[MR][NV], const float* x, const int64_t* koff, const float* w, int64_t steps,
                             int64_t bo) {
  Vec tile[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) tile[i][j] = Vec(0.f);
  for (int64_t s = 0; s < steps; ++s, w += bo) Step::template step<MR, NV>(tile, x + koff[s], w);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = tile[i][j];
}

struct Bsr {
  const float* vals;
  const int64_t* cols;
  const int64_t* rptr;
  int64_t R, bk, bo;
};

// The column row of every nonzero k step (block b, row kk of it: step b*bk + kk),
// as offsets from a strip's first q: src_off[k] mapped through the blocks'
// column indices.
std::vector<int64_t> step_offsets(const Bsr& w, const std::vector<int64_t>& src_off) {
  std::vector<int64_t> steps(w.rptr[w.R] * w.bk);
  for (int64_t b = 0; b < w.rptr[w.R]; ++b)
    for (int64_t kk = 0; kk < w.bk; ++kk) steps[b * w.bk + kk] = src_off[w.cols[b] * w.bk + kk];
  return steps;
}

// Where pixel (row, col) of output plane `plane` (image * cout + channel) is: planes and rows
// may be strided (a padded layout's interior, see block_sparse_conv2d_cpu), pixels are not.
struct PlaneLayout {
  int64_t plane_stride, row_stride;
  int64_t at(int64_t plane, int64_t row, int64_t col) const { return plane * plane_stride + row * row_stride + col; }
};

struct Epilogue {
  const float* bias;
  bool relu;
  float negative_slope;     // of the activation when relu: 0 is ReLU, > 0 LeakyReLU
  int64_t pool;             // p x p max-pool with stride p after the conv; 1: none
  int64_t cout, ohow;       // ohow: pixels per plane of the stored (pooled) output
  void* out;                // (N, cout, OH / pool, OW / pool) of out_type
  PlaneLayout out_layout;
  at::ScalarType out_type;  // float, bfloat16 or half: the input's dtype
  const void* residual;     // nullptr, or (N, cout, OH, OW) of out_type added before the activation
  PlaneLayout res_layout;
  bool dense_planes;        // output and residual planes are contiguous, with no gaps between them
  int64_t out_padding;      // q > 0: the output planes have q-pixel zero borders, written with its rows
  int64_t out_h, out_w;     // the stored (pooled) output's rows and columns

  bool leaky() const { return relu && negative_slope != 0.f; }

  // v, or its ReLU / LeakyReLU when relu.
  Vec activate(Vec v) const {
    if (!relu) return v;
    if (negative_slope == 0.f) return at::vec::clamp_min(v, Vec(0.f));
    return at::vec::fmadd(Vec(negative_slope), at::vec::minimum(v, Vec(0.f)), at::vec::maximum(v, Vec(0.f)));
  }

  // src[0:n] = activate(src[0:n]), out of line (see block_row).
  C10_NOINLINE void activate_n(float* src, int64_t n) const {
    for (int64_t i = 0; i < n; i += kW) {
      const int64_t m = std::min<int64_t>(kW, n - i);
      activate(Vec::loadu(src + i, m)).store(src + i, m);
    }
  }

  // src[0:n] += residual[offset : offset + n] (widened to fp32), then the activation.
  C10_NOINLINE void add_residual(int64_t offset, float* src, int64_t n) const {
    alignas(64) float r[kStrip];
    switch (out_type) {
      case at::kBFloat16: copy_n(r, static_cast<const at::BFloat16*>(residual) + offset, n); break;
      case at::kHalf: copy_n(r, static_cast<const at::Half*>(residual) + offset, n); break;
      default: copy_n(r, static_cast<const float*>(residual) + offset, n);
    }
    for (int64_t i = 0; i < n; i += kW) {
      const int64_t m = std::min<int64_t>(kW, n - i);
      activate(Vec::loadu(src + i, m) + Vec::loadu(r + i, m)).store(src + i, m);
    }
  }

  // out[offset : offset + n] = src[0:n] (fp32), rounded to the output dtype.
  void store(int64_t offset, const float* src, int64_t n) const {
    switch (out_type) {
      case at::kBFloat16: return copy_n(static_cast<at::BFloat16*>(out) + offset, src, n);
      case at::kHalf: return copy_n(static_cast<at::Half*>(out) + offset, src, n);
      default: return copy_n(static_cast<float*>(out) + offset, src, n);
    }
  }

  // out[offset : offset + n] = 0.
  void zero(int64_t offset, int64_t n) const {
    switch (out_type) {
      case at::kBFloat16: return (void)std::fill_n(static_cast<at::BFloat16*>(out) + offset, n, at::BFloat16(0.f));
      case at::kHalf: return (void)std::fill_n(static_cast<at::Half*>(out) + offset, n, at::Half(0.f));
      default: return (void)std::fill_n(static_cast<float*>(out) + offset, n, 0.f);
    }
  }

  // Pixels [col, col + n) of row `row` of output plane `plane` = src[0:n], and with out_padding
  // the zero borders after them: a run that ends a row zeroes the 2q border pixels up to the next
  // row's first pixel (after the last row: up to the plane's end), and row 0's first run the
  // border before it. The borders are written with the rows they touch, while those cache lines
  // are being written anyway, not in a pass of their own.
  void store_row(int64_t plane, int64_t row, int64_t col, const float* src, int64_t n) const {
    const int64_t o = out_layout.at(plane, row, col);
    store(o, src, n);
    if (out_padding == 0) return;
    // The padded row, from the geometry: out_layout.row_stride is canonicalised to out_w when
    // the plane has a single row (plane_layout).
    const int64_t q = out_padding, width = out_w + 2 * q;
    if (col == 0 && row == 0) zero(o - q * width - q, q * width + q);
    if (col + n == out_w) zero(o + n, row == out_h - 1 ? q + q * width : 2 * q);
  }
};

// Output rows of block row r for the q strip [q0, q0 + NV*kW) of source image g,
// stored from q = qs >= q0 on; x points at the strip's first q, koff[s]
// locates nonzero step s's column row from there.
template <int MR, int NV, class Step>
void block_row(const Source& src, const float* x, const int64_t* koff, int64_t g, int64_t q0, int64_t qs, int64_t r,
               const Bsr& w, const Epilogue& e) {
  constexpr int64_t SW = NV * kW;
  const int64_t ohow = e.ohow, cout = e.cout;
  const int64_t qend = std::min(q0 + SW, src.img_q);
  // 1x1 fp32: q is the pixel, so whole vectors go straight to the output (ReLU or none).
  const bool contiguous = e.out_type == at::kFloat && src.wq == src.ow && e.dense_planes && qs == q0 &&
                          qend - q0 == SW && !e.leaky();
  const int64_t out_g = g * cout * ohow;
  for (int64_t i0 = 0; i0 < w.bo; i0 += MR) {
    const int64_t co0 = r * w.bo + i0;
    const int64_t rows = std::min<int64_t>(MR, cout - co0);
    if (rows <= 0) break;  // padding rows of the last block row
    Vec acc[MR][NV];
    const int64_t s0 = w.rptr[r] * w.bk;
    accumulate<MR, NV, Step>(acc, x, koff + s0, w.vals + s0 * w.bo + i0, w.rptr[r + 1] * w.bk - s0, w.bo);
    // The register tile takes the bias and a ReLU only. A LeakyReLU is applied in the scatter
    // below, out of line (activate_n, add_residual): with its vector code in this function, a
    // 64-channel 3x3 ReLU layer measured ~20 % slower at 1 thread.
    const bool relu_here = e.relu && !e.residual && !e.leaky();
    for (int i = 0; i < MR; ++i) {
      const Vec b(e.bias && i < rows ? e.bias[co0 + i] : 0.f);
      for (int j = 0; j < NV; ++j) {
        acc[i][j] = acc[i][j] + b;
        if (relu_here) acc[i][j] = at::vec::clamp_min(acc[i][j], Vec(0.f));
      }
    }
    if (contiguous) {
      float* o = static_cast<float*>(e.out) + out_g + co0 * ohow + q0;
      const float* res = e.residual ? static_cast<const float*>(e.residual) + out_g + co0 * ohow + q0 : nullptr;
      for (int64_t i = 0; i < rows; ++i)
        for (int j = 0; j < NV; ++j) {
          Vec v = acc[i][j];
          if (e.residual) {
            v = v + Vec::loadu(res + i * ohow + j * kW);
            if (e.relu) v = at::vec::clamp_min(v, Vec(0.f));
          }
          v.store(o + i * ohow + j * kW);
        }
      continue;
    }
    // Scatter the valid run of each q-row.
    alignas(64) float tmp[MR][SW];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j].store(&tmp[i][j * kW]);
    for (int64_t q = qs; q < qend;) {
      const int64_t row = q / src.wq, c = q % src.wq;
      if (c >= src.ow) {
        q = (row + 1) * src.wq;
        continue;
      }
      // Without dropped lanes (wq == ow) the q-rows are contiguous in dense output planes too.
      const int64_t len = src.wq == src.ow && e.dense_planes ? qend - q : std::min(src.ow - c, qend - q);
      const int64_t plane = g * cout + co0;
      for (int64_t i = 0; i < rows; ++i) {
        if (e.residual) {
          e.add_residual(e.res_layout.at(plane + i, row, c), &tmp[i][q - q0], len);
        } else if (e.leaky()) {
          e.activate_n(&tmp[i][q - q0], len);
        }
        e.store_row(plane + i, row, c, &tmp[i][q - q0], len);
      }
      q += len;
    }
  }
}

// block_row with nv <= NV vectors (the narrower last strip of an image).
template <int MR, int NV, class Step>
void block_row_n(int nv, const Source& src, const float* x, const int64_t* koff, int64_t g, int64_t q0, int64_t qs,
                 int64_t r, const Bsr& w, const Epilogue& e) {
  if constexpr (NV > 1) {
    if (nv < NV) return block_row_n<MR, NV - 1, Step>(nv, src, x, koff, g, q0, qs, r, w, e);
  }
  block_row<MR, NV, Step>(src, x, koff, g, q0, qs, r, w, e);
}

// Runs tile(t) for t in [0, ntiles) on the intra-op threads. Tiles are cut
// into kChunksPerThread contiguous chunks per thread of equal estimated cost
// (cost(t); block rows differ in density and tail strips are narrow), which
// the threads claim in turn from a shared counter: a thread that starts late
// (woken late, or preempted on a loaded machine) leaves its chunks to the
// others instead of making every call wait for it.
template <class Cost, class Tile>
void run_tiles(int64_t ntiles, const Cost& cost, const Tile& tile) {
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), ntiles);
  const int64_t nchunks = std::min<int64_t>(nthreads * kChunksPerThread, ntiles);
  std::vector<int64_t> split(nchunks + 1, ntiles);
  int64_t total = 0;
  for (int64_t t = 0; t < ntiles; ++t) total += cost(t);
  split[0] = 0;
  int64_t acc = 0, i = 1;
  for (int64_t t = 0; t < ntiles && i < nchunks; ++t) {
    acc += cost(t);
    while (i < nchunks && acc * nchunks >= total * i) split[i++] = t + 1;
  }
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next_chunk++; c < nchunks; c = next_chunk++)
      for (int64_t t = split[c]; t < split[c + 1]; ++t) tile(t);
  });
}

// Strips of NV vectors of q; the last strip of each image only as many vectors
// as it needs, so at most kW - 1 lanes per image are computed for nothing (or
// recomputed, where the last strip is moved back to end at the image's end).
// Tiles run in (image, strip, block row) order, so a thread keeps one strip of
// input in L2 across block rows.
template <int MR, int NV, class Step>
void conv_tiles(const Source& src, const Bsr& w, const Epilogue& e) {
  constexpr int64_t SW = NV * kW;
  const int64_t strips = (src.img_q + SW - 1) / SW;
  const int tail_nv = static_cast<int>((src.img_q - (strips - 1) * SW + kW - 1) / kW);
  const std::vector<int64_t> steps = step_offsets(w, src.off);
  run_tiles(
      src.n_img * strips * w.R,
      [&](int64_t t) {  // nonzero k steps x vectors, plus the epilogue
        const int64_t r = t % w.R, strip = (t / w.R) % strips;
        return ((w.rptr[r + 1] - w.rptr[r]) * w.bk + 8) * (strip == strips - 1 ? tail_nv : NV) * w.bo;
      },
      [&](int64_t t) {
        const int64_t r = t % w.R;
        const int64_t strip = (t / w.R) % strips;
        const int64_t g = t / (w.R * strips);
        const int nv = strip == strips - 1 ? tail_nv : NV;
        const int64_t qs = strip * SW;
        const int64_t q0 = src.exact_end && strip == strips - 1 ? src.img_q - nv * kW : qs;
        const float* x = src.data + g * src.img_stride + q0;
        block_row_n<MR, NV, Step>(nv, src, x, steps.data(), g, q0, qs, r, w, e);
      });
}

// dst[j] = max over the p x p window (a, b) of rows[a * wq + p * j + b], j < n,
// in place (dst == rows: each dst[j] is written after every read at or below
// p * j). p == 2 is vectorised: the max of the two rows, then of even and odd
// lanes; it reads up to 2 kW lanes past row 1's last window (the buffer's slack).
// NaN propagates, as in torch's max-pool.
inline void max_pool_row(float* rows, int64_t wq, int64_t p, int64_t n) {
  if (p == 2) {
    for (int64_t j = 0; j < n; j += kW) {
      const float* r0 = rows + 2 * j;
      const Vec lo = at::vec::maximum(Vec::loadu(r0), Vec::loadu(r0 + wq));
      const Vec hi = at::vec::maximum(Vec::loadu(r0 + kW), Vec::loadu(r0 + wq + kW));
      const auto [even, odd] = at::vec::deinterleave2(lo, hi);
      at::vec::maximum(even, odd).store(rows + j, std::min<int64_t>(kW, n - j));
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    float m = rows[p * j];
    for (int64_t a = 0; a < p; ++a)
      for (int64_t b = 0; b < p; ++b) {
        const float v = rows[a * wq + p * j + b];
        if (v > m || v != v) m = v;
      }
    rows[j] = m;
  }
}

// Pooled output row i of block row r for source image g (fused pool, see the
// header): the conv rows [p*i, p*i + p), p*wq q lanes, in full strips of NV
// vectors into a per-thread buffer, then max_pool_row, + bias, activation and
// the store of each channel's row of OW / p pixels.
template <int MR, int NV, class Step>
void pooled_block_row(const Source& src, const int64_t* koff, int64_t g, int64_t i, int64_t r, const Bsr& w,
                      const Epilogue& e) {
  constexpr int64_t SW = NV * kW;
  const int64_t p = e.pool, wq = src.wq, ow = src.ow / p;
  const int64_t strips = (p * wq + SW - 1) / SW;
  const int64_t row_len = strips * SW + 2 * kW;  // + max_pool_row's overrun
  thread_local std::vector<float> buf;
  float* rows = scratch(buf, MR * row_len);
  const float* x = src.data + g * src.img_stride + p * i * wq;
  const int64_t s0 = w.rptr[r] * w.bk, steps = w.rptr[r + 1] * w.bk - s0;
  for (int64_t i0 = 0; i0 < w.bo; i0 += MR) {
    const int64_t co0 = r * w.bo + i0;
    const int64_t nrows = std::min<int64_t>(MR, e.cout - co0);
    if (nrows <= 0) break;  // padding rows of the last block row
    for (int64_t s = 0; s < strips; ++s) {
      Vec acc[MR][NV];
      accumulate<MR, NV, Step>(acc, x + s * SW, koff + s0, w.vals + s0 * w.bo + i0, steps, w.bo);
      for (int ii = 0; ii < MR; ++ii)
        for (int j = 0; j < NV; ++j) acc[ii][j].store(rows + ii * row_len + s * SW + j * kW);
    }
    for (int64_t ii = 0; ii < nrows; ++ii) {
      float* row = rows + ii * row_len;
      max_pool_row(row, wq, p, ow);
      const Vec b(e.bias ? e.bias[co0 + ii] : 0.f);
      for (int64_t j = 0; j < ow; j += kW) {
        const int64_t m = std::min<int64_t>(kW, ow - j);
        e.activate(Vec::loadu(row + j, m) + b).store(row + j, m);
      }
      e.store_row(g * e.cout + co0 + ii, i, 0, row, ow);
    }
  }
}

// The fused-pool tiles: (image, pooled row, block row), in that order.
template <int MR, int NV, class Step>
void pooled_tiles(const Source& src, const Bsr& w, const Epilogue& e) {
  constexpr int64_t SW = NV * kW;
  const int64_t pooled_rows = src.img_q / src.wq / e.pool;
  const int64_t strips = (e.pool * src.wq + SW - 1) / SW;
  const std::vector<int64_t> steps = step_offsets(w, src.off);
  run_tiles(
      src.n_img * pooled_rows * w.R,
      [&](int64_t t) {
        const int64_t r = t % w.R;
        return ((w.rptr[r + 1] - w.rptr[r]) * w.bk + 8) * strips * NV * w.bo;
      },
      [&](int64_t t) {
        pooled_block_row<MR, NV, Step>(src, steps.data(), t / (w.R * pooled_rows), (t / w.R) % pooled_rows,
                                       t % w.R, w, e);
      });
}

// The tiles of the conv, pooled or not.
template <int MR, int NV, class Step = Fp32Fma>
void conv_or_pooled_tiles(const Source& src, const Bsr& w, const Epilogue& e) {
  if (e.pool > 1) return pooled_tiles<MR, NV, Step>(src, w, e);
  conv_tiles<MR, NV, Step>(src, w, e);
}

// The zero-padded phase planes of every (image, channel) plane of x, as fp32:
// phase (a, b) of plane nc holds padded pixels (i*sh + a, j*sw + b) at
// buf[(nc*sh*sw + a*sw + b) * Hq*Wq + i*Wq + j]. x's planes are x_layout apart
// and its rows too (an unpadded view of a padded layout is read as it is). Only
// the phases some tap reads are written; the zero borders only when zero_borders
// (they survive in a reused buffer).
template <typename T>
void copy_to_phase_planes(const T* x, PlaneLayout x_layout, float* buf, int64_t NC, int64_t H, int64_t W,
                          int64_t ph, int64_t pw, int64_t sh, int64_t sw, int64_t Hq, int64_t Wq,
                          const std::vector<char>& used, bool zero_borders) {
  const int64_t plane = Hq * Wq, P = sh * sw;
  at::parallel_for(0, NC, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const T* src_plane = x + x_layout.at(nc, 0, 0);
      if (sh == 1 && sw == 1 && pw == 0 && x_layout.row_stride == W) {  // the plane's rows are one run
        float* d = buf + nc * plane;
        if (zero_borders) {
          std::fill(d, d + ph * Wq, 0.f);
          std::fill(d + (ph + H) * Wq, d + plane, 0.f);
        }
        copy_n(d + ph * Wq, src_plane, H * W);
        continue;
      }
      for (int64_t pa = 0; pa < sh; ++pa) {
        for (int64_t pb = 0; pb < sw; ++pb) {
          if (!used[pa * sw + pb]) continue;
          float* d = buf + (nc * P + pa * sw + pb) * plane;
          if (zero_borders) std::fill(d, d + plane, 0.f);
          // Columns j with an input pixel: pw <= j*sw + pb < pw + W.
          const int64_t j0 = std::max<int64_t>(0, (pw - pb + sw - 1) / sw);
          const int64_t j1 = std::min<int64_t>(Wq, (pw + W - pb + sw - 1) / sw);
          for (int64_t i = 0; i < Hq; ++i) {
            const int64_t h = i * sh + pa - ph;
            if (h < 0 || h >= H || j1 <= j0) continue;
            const T* srow = src_plane + h * x_layout.row_stride + (j0 * sw + pb - pw);
            float* drow = d + i * Wq + j0;
            if (sw == 1) {
              copy_n(drow, srow, j1 - j0);
            } else {
              for (int64_t j = 0; j < j1 - j0; ++j) drow[j] = static_cast<float>(srow[j * sw]);
            }
          }
        }
      }
    }
  });
}

#ifdef PYCOMPRESS_BF16_DOT
// The bf16 source of Bf16PairDot: 32-bit element (p, q) = x[2p][q] | x[2p+1][q] << 16
// for the NP channel-plane pairs of the (N*C, HW) bf16 input.
void interleave_channel_pairs(const at::BFloat16* x, float* dst, int64_t NP, int64_t HW) {
  at::parallel_for(0, NP, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const uint16_t* lo = reinterpret_cast<const uint16_t*>(x) + 2 * p * HW;
      const uint16_t* hi = lo + HW;
      int32_t* d = reinterpret_cast<int32_t*>(dst) + p * HW;
      for (int64_t q = 0; q < HW; q += 16) {
        const __mmask16 m = HW - q >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (HW - q)) - 1);
        const __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo + q));
        const __m512i b = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi + q));
        _mm512_mask_storeu_epi32(d + q, m, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
      }
    }
  });
}

// The weights of Bf16PairDot, (nnzb, bk/2, bo) int32: element (b, p, i) holds
// bf16(w[b][2p][i]) | bf16(w[b][2p+1][i]) << 16, rounded to nearest even. bo % 8 == 0.
at::Tensor pack_bf16_weight_pairs(const at::Tensor& values) {
  const int64_t nnzb = values.size(0), bk = values.size(1), bo = values.size(2);
  at::Tensor pairs = at::empty({nnzb, bk / 2, bo}, values.options().dtype(at::kInt));
  const float* v = values.const_data_ptr<float>();
  int32_t* d = pairs.data_ptr<int32_t>();
  const __m256i interleave = _mm256_setr_epi16(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  for (int64_t row = 0; row < nnzb * (bk / 2); ++row) {  // rows 2p and 2p+1 of a block are adjacent
    const float* k0 = v + row * 2 * bo;
    for (int64_t i = 0; i < bo; i += 8) {
      const __m512 both = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(k0 + i)),
                                             _mm256_loadu_ps(k0 + bo + i), 1);
      const __m256i bf = (__m256i)_mm512_cvtneps_pbh(both);  // k0[i..i+8), then k1[i..i+8)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + row * bo + i), _mm256_permutexvar_epi16(interleave, bf));
    }
  }
  return pairs;
}
#endif

// The conv's geometry, from arguments checked against the schema's contract.
struct ConvGeometry {
  at::ScalarType dtype;
  int64_t N, C, H, W;          // input
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t OH, OW;              // output
  int64_t K, R, bk, bo;        // GEMM depth C*kh*kw, block rows, block size
};

ConvGeometry check_arguments(const at::Tensor& input, const at::Tensor& values, const at::Tensor& col_idx,
                             const at::Tensor& row_ptr, const std::optional<at::Tensor>& bias, at::IntArrayRef kernel,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             int64_t out_channels, const std::optional<at::Tensor>& residual, bool relu,
                             double negative_slope, int64_t pool, int64_t out_padding) {
  constexpr const char* op = "pycompress::block_sparse_conv2d: ";
  TORCH_CHECK_VALUE(input.dim() == 4, op, "input must be 4-D (N, C, H, W), got ", input.dim(), "-D");
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                   "input must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(values.dim() == 3, op, "values must be 3-D (nnzb, bk, bo), got ", values.dim(), "-D");
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat, op, "values must be float32, got ", values.scalar_type());
  TORCH_CHECK_TYPE(col_idx.scalar_type() == at::kLong && row_ptr.scalar_type() == at::kLong, op,
                   "col_idx and row_ptr must be int64, got ", col_idx.scalar_type(), " and ",
                   row_ptr.scalar_type());
  TORCH_CHECK_VALUE(col_idx.dim() == 1 && col_idx.size(0) == values.size(0), op, "col_idx must be (nnzb,) = (",
                    values.size(0), ",), got ", col_idx.sizes());
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.size(0) >= 2, op,
                    "row_ptr must be 1-D with at least 2 entries, got ", row_ptr.sizes());
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    "kernel, stride, padding and dilation must have 2 entries each");
  ConvGeometry g{dtype, input.size(0), input.size(1), input.size(2), input.size(3),
                 kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  TORCH_CHECK_VALUE(g.kh >= 1 && g.kw >= 1 && g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 &&
                        g.pw >= 0, op,
                    "kernel, stride and dilation must be >= 1 and padding >= 0, got kernel ", kernel, ", stride ",
                    stride, ", padding ", padding, ", dilation ", dilation);
  g.bk = values.size(1), g.bo = values.size(2);
  g.R = row_ptr.size(0) - 1;
  g.K = g.C * g.kh * g.kw;
  TORCH_CHECK_VALUE(g.bk >= 1 && g.bo >= 1, op, "block size (bo, bk) = (", g.bo, ", ", g.bk, ") must be positive");
  TORCH_CHECK_VALUE(g.K % g.bk == 0, op, "block width bk=", g.bk, " must divide in_channels*kh*kw = ", g.C, "*", g.kh,
                    "*", g.kw, " = ", g.K, " (the input has ", g.C, " channels)");
  TORCH_CHECK_VALUE(out_channels > (g.R - 1) * g.bo && out_channels <= g.R * g.bo, op, "out_channels=", out_channels,
                    " does not match ", g.R, " block rows of bo=", g.bo, " (expected ", (g.R - 1) * g.bo + 1, "..",
                    g.R * g.bo, ")");
  g.OH = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK_VALUE(g.OH >= 1 && g.OW >= 1, op, "input ", input.sizes(), " is smaller than the dilated kernel");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_channels, op, "bias must be (", out_channels,
                      ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, op, "bias must be float32, got ", bias->scalar_type());
  }
  // The fused pool moves the activation before the max, which needs a monotone one.
  TORCH_CHECK_VALUE(std::isfinite(negative_slope) && negative_slope >= 0, op,
                    "negative_slope must be finite and >= 0, got ", negative_slope);
  TORCH_CHECK_VALUE(relu || negative_slope == 0, op, "negative_slope=", negative_slope, " needs relu=True");
  TORCH_CHECK_VALUE(pool >= 1, op, "pool must be >= 1, got ", pool);
  TORCH_CHECK_VALUE(pool == 1 || !(residual.has_value() && residual->defined()), op,
                    "residual cannot be combined with pool=", pool);
  TORCH_CHECK_VALUE(g.OH >= pool && g.OW >= pool, op, "the conv's output ", g.OH, "x", g.OW,
                    " is smaller than pool=", pool);
  TORCH_CHECK_VALUE(out_padding >= 0, op, "out_padding must be >= 0, got ", out_padding);
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({g.N, out_channels, g.OH, g.OW}), op,
                      "residual must have the output's shape (", g.N, ", ", out_channels, ", ", g.OH, ", ", g.OW,
                      "), got ", residual->sizes());
    TORCH_CHECK_TYPE(residual->scalar_type() == dtype, op, "residual must have the input's dtype ", dtype,
                     ", got ", residual->scalar_type());
  }
  return g;
}

// The BSR index arrays' contents (row_ptr monotone from 0 to nnzb, col_idx in range and strictly
// increasing within a row).
void check_block_indices(const int64_t* cols, const int64_t* rptr, int64_t nnzb, const ConvGeometry& g) {
  constexpr const char* op = "pycompress::block_sparse_conv2d: ";
  const int64_t kblocks = g.K / g.bk;
  TORCH_CHECK_VALUE(rptr[0] == 0 && rptr[g.R] == nnzb, op, "row_ptr must start at 0 and end at nnzb=", nnzb,
                    ", got ", rptr[0], " and ", rptr[g.R]);
  for (int64_t r = 0; r < g.R; ++r)
    TORCH_CHECK_VALUE(rptr[r] <= rptr[r + 1], op, "row_ptr must be non-decreasing (row ", r, ")");
  for (int64_t b = 0; b < nnzb; ++b)
    TORCH_CHECK_VALUE(cols[b] >= 0 && cols[b] < kblocks, op, "col_idx[", b, "] = ", cols[b], " is outside [0, ",
                      kblocks, ")");
  // A repeated column would be added twice here but kept once by a dense export.
  for (int64_t r = 0; r < g.R; ++r)
    for (int64_t b = rptr[r] + 1; b < rptr[r + 1]; ++b)
      TORCH_CHECK_VALUE(cols[b] > cols[b - 1], op, "col_idx must be strictly increasing within each block row; row ",
                        r, " has ", cols[b - 1], " then ", cols[b]);
}

// How the micro-kernel reads the input (see the header): in place, as bf16
// channel pairs, through the zero-padded phase planes, or in place from the
// padded layout another conv wrote (out_padding) when its interior is the input.
enum class SourceKind { kDirect, kBf16Pairs, kPhasePlanes, kPaddedView };

// Elements a padded layout keeps after its last plane: the consumer's last strip
// reads dropped lanes up to kStrip + dw*(kw-1) + Wq past it (kStrip <= 96 on any
// ISA, dw*(kw-1) < Wq). pycompress/ops/block_sparse.py allocates the same slack.
int64_t padded_layout_slack(int64_t padded_width) { return 2 * padded_width + 128; }

// The layout of x's planes: the plane and row strides of a 4-D tensor whose pixels are contiguous
// and whose planes are evenly spaced (contiguous, or the interior of a padded layout).
std::optional<PlaneLayout> plane_layout(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  // A size-1 dimension's stride is arbitrary (a view of a (64, 1) tensor as (1, 64, 1, 1) has
  // strides (64, 1, 64, 64)): take a contiguous tensor's there.
  const int64_t col = W > 1 ? x.stride(3) : 1;
  const int64_t row = H > 1 ? x.stride(2) : W;
  const int64_t plane = C > 1 ? x.stride(1) : N > 1 ? x.stride(0) : H * row;
  if (col != 1 || row < W || plane < H * row || (N > 1 && x.stride(0) != C * plane)) return std::nullopt;
  return PlaneLayout{plane, row};
}

// True when x (fp32) is the interior of a zero-padded layout of exactly this conv's padding, with
// the slack its last strip reads: then the conv reads x's storage in place (kPaddedView) instead
// of copying it. The borders are checked (a tensor's view says nothing about the memory around
// it), reading about 2 (ph + pw) / H of what the copy would move.
bool is_padded_view(const at::Tensor& x, const ConvGeometry& g) {
  if (g.dtype != at::kFloat || g.sh != 1 || g.sw != 1 || (g.ph == 0 && g.pw == 0)) return false;
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw, plane = Hp * Wp;
  if (x.stride(3) != 1 || x.stride(2) != Wp || x.stride(1) != plane || x.stride(0) != g.C * plane) return false;
  const int64_t lead = g.ph * Wp + g.pw;  // elements of border before pixel (0, 0)
  const int64_t slack = kStrip + g.dw * (g.kw - 1) + Wp;
  const int64_t storage = static_cast<int64_t>(x.storage().nbytes() / sizeof(float));
  if (x.storage_offset() < lead || x.storage_offset() - lead + g.N * g.C * plane + slack > storage) return false;
  const float* base = x.const_data_ptr<float>() - lead;
  std::atomic<bool> zero{true};
  at::parallel_for(0, g.N * g.C, 16, [&](int64_t begin, int64_t end) {
    const auto all_zero = [](const float* p, int64_t n) {
      for (int64_t i = 0; i < n; ++i)
        if (p[i] != 0.f) return false;  // -0 counts as zero: the padded copy adds +0, the same sums
      return true;
    };
    const int64_t last = (g.ph + g.H - 1) * Wp + g.pw + g.W;  // just after the last pixel
    for (int64_t nc = begin; nc < end && zero.load(std::memory_order_relaxed); ++nc) {
      const float* pl = base + nc * plane;
      // The border up to the first pixel, every right border with the next row's left one, and
      // from the last pixel to the plane's end.
      bool ok = all_zero(pl, lead) && all_zero(pl + last, plane - last);
      for (int64_t h = 0; ok && h + 1 < g.H; ++h) ok = all_zero(pl + (g.ph + h) * Wp + g.pw + g.W, 2 * g.pw);
      if (!ok) zero = false;
    }
  });
  return zero;
}

// The column rows' source for `kind`: the input itself, or a per-thread cached
// buffer filled from it.
Source make_source(SourceKind kind, const at::Tensor& input, const ConvGeometry& g) {
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W;
  const int64_t kh = g.kh, kw = g.kw, sh = g.sh, sw = g.sw, ph = g.ph, pw = g.pw, dh = g.dh, dw = g.dw;
  Source src;
  std::vector<int64_t>& off = src.off;
  off.resize(g.K);
  thread_local std::vector<float> src_buf;                 // the padded phase planes
  thread_local std::array<int64_t, 13> src_geometry{};     // of the copy now in src_buf
  // A source of `planes` unpadded (H, W) planes per image, each one k step (q = pixel).
  auto plane_source = [&](const float* data, int64_t planes) {
    src.data = data, src.img_stride = planes * H * W, src.n_img = N;
    src.img_q = H * W, src.wq = W, src.ow = W;
    src.exact_end = true;
    off.resize(planes);
    for (int64_t c = 0; c < planes; ++c) off[c] = c * H * W;
  };
  if (kind == SourceKind::kDirect) {
    plane_source(input.const_data_ptr<float>(), C);
    return src;
  }
  if (kind == SourceKind::kBf16Pairs) {
#ifdef PYCOMPRESS_BF16_DOT
    float* buf = scratch(src_buf, N * C / 2 * H * W);
    src_geometry = {};  // the padded copy's zero borders are gone from the buffer
    interleave_channel_pairs(input.const_data_ptr<at::BFloat16>(), buf, N * C / 2, H * W);
    plane_source(buf, C / 2);  // one 32-bit element per channel pair
#endif
    return src;
  }
  // Zero-padded input split into sh*sw phase planes: phase (a, b) holds the
  // padded pixels (i*sh + a, j*sw + b). Tap (r, s) of output (oh, ow) is then
  // pixel (oh + r*dh/sh, ow + s*dw/sw) of phase ((r*dh)%sh, (s*dw)%sw), a
  // constant offset from q = oh*Wq + ow: a strided conv becomes sh*sw
  // stride-1 ones over a single copy of the input (stride 1: one phase, which
  // a padded view already is).
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const int64_t Hq = (Hp + sh - 1) / sh, Wq = (Wp + sw - 1) / sw, plane = Hq * Wq, P = sh * sw;
  if (kind == SourceKind::kPaddedView) {
    src.data = input.const_data_ptr<float>() - (ph * Wp + pw);
  } else {
    std::vector<char> used(P, 0);  // phases some tap reads (a 1x1 stride-2 conv needs one of four)
    for (int64_t r = 0; r < kh; ++r)
      for (int64_t s = 0; s < kw; ++s) used[((r * dh) % sh) * sw + (s * dw) % sw] = 1;
    // Slack after the last plane: the last strip's dropped lanes read past it.
    const int64_t len = N * C * P * plane + kStrip + (dw * (kw - 1)) / sw + Wq;
    float* buf = scratch(src_buf, len);
    // The zero borders survive in the cached buffer: rewrite them only when
    // the geometry (or the buffer) changed since the last call on this thread.
    const std::array<int64_t, 13> geometry{N, C, H, W, ph, pw, sh, sw, kh, kw, dh, dw,
                                           reinterpret_cast<int64_t>(buf)};
    const bool zero_borders = geometry != src_geometry;
    const PlaneLayout x_layout = *plane_layout(input);
    AT_DISPATCH_V2(g.dtype, "block_sparse_conv2d", AT_WRAP([&] {
      copy_to_phase_planes(input.const_data_ptr<scalar_t>(), x_layout, buf, N * C, H, W, ph, pw, sh, sw, Hq, Wq,
                           used, zero_borders);
    }), at::kFloat, at::kBFloat16, at::kHalf);
    if (zero_borders) std::fill(buf + N * C * P * plane, buf + len, 0.f);
    src_geometry = geometry;
    src.data = buf;
  }
  src.img_stride = C * P * plane, src.n_img = N;
  src.img_q = g.OH * Wq, src.wq = Wq, src.ow = g.OW;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < kh; ++r)
      for (int64_t s = 0; s < kw; ++s)
        off[(c * kh + r) * kw + s] = (c * P + ((r * dh) % sh) * sw + (s * dw) % sw) * plane +
                                     (r * dh) / sh * Wq + (s * dw) / sw;
  return src;
}

// Runs the tiles with the widest micro-tile the block height allows (8 x 3 for
// 1x1 convs with bo % 8 == 0, bf16 pair products for kBf16Pairs).
void dispatch_tiles(const Source& src, SourceKind kind, bool tall_tiles, const at::Tensor& values,
                    const int64_t* cols, const int64_t* rptr, const ConvGeometry& g, const Epilogue& e) {
#ifdef PYCOMPRESS_BF16_DOT
  if (kind == SourceKind::kBf16Pairs) {
    const at::Tensor pairs = pack_bf16_weight_pairs(values);
    const Bsr wp{reinterpret_cast<const float*>(pairs.const_data_ptr()), cols, rptr, g.R, g.bk / 2, g.bo};
    return conv_tiles<8, 3, Bf16PairDot>(src, wp, e);
  }
#endif
  const Bsr w{values.const_data_ptr<float>(), cols, rptr, g.R, g.bk, g.bo};
  if (tall_tiles) {
    conv_or_pooled_tiles<8, 3>(src, w, e);
  } else if (g.bo % 4 == 0) {
    conv_or_pooled_tiles<4, kNV>(src, w, e);
  } else if (g.bo % 2 == 0) {
    conv_or_pooled_tiles<2, kNV>(src, w, e);
  } else {
    conv_or_pooled_tiles<1, kNV>(src, w, e);
  }
}

// An uninitialised (N, C, OH, OW) output. With out_padding = q > 0 it is the interior of a
// layout whose planes have q-pixel zero borders (written by the store, Epilogue::store_row),
// followed by the slack the next conv's strips read: a conv of padding q reads such a tensor in
// place (is_padded_view).
at::Tensor empty_output(const ConvGeometry& g, int64_t out_channels, int64_t OH, int64_t OW, int64_t q,
                        const at::TensorOptions& options) {
  if (q == 0) return empty_hugepage({g.N, out_channels, OH, OW}, options, BlockCache::activations());
  const int64_t Hb = OH + 2 * q, Wb = OW + 2 * q, plane = Hb * Wb, planes = g.N * out_channels;
  const int64_t slack = padded_layout_slack(Wb);
  at::Tensor buf = empty_hugepage({planes * plane + slack}, options, BlockCache::activations());
  buf.narrow(0, planes * plane, slack).zero_();  // only dropped lanes read it: zeros keep them finite
  return buf.as_strided({g.N, out_channels, OH, OW}, {out_channels * plane, plane, Wb, 1}, q * Wb + q);
}

at::Tensor block_sparse_conv2d_cpu(const at::Tensor& input_in, const at::Tensor& values_in, const at::Tensor& col_idx_in,
                                   const at::Tensor& row_ptr_in, const std::optional<at::Tensor>& bias_in,
                                   at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t out_channels, bool relu,
                                   const std::optional<at::Tensor>& residual_in, double negative_slope,
                                   int64_t pool, int64_t out_padding) {
  const ConvGeometry g = check_arguments(input_in, values_in, col_idx_in, row_ptr_in, bias_in, kernel, stride,
                                         padding, dilation, out_channels, residual_in, relu, negative_slope, pool,
                                         out_padding);
  // Planes may be strided (a padded layout's interior): the kernel reads and writes them as they are.
  const auto plane_strided = [](const at::Tensor& t) { return plane_layout(t) ? t : t.contiguous(); };
  at::Tensor residual;
  if (residual_in.has_value() && residual_in->defined()) residual = plane_strided(*residual_in);
  at::Tensor bias_t;
  if (bias_in.has_value() && bias_in->defined()) bias_t = bias_in->contiguous();
  at::Tensor input = plane_strided(input_in);
  const at::Tensor values = values_in.contiguous();
  const at::Tensor cols_t = col_idx_in.contiguous(), rptr_t = row_ptr_in.contiguous();
  const int64_t* cols = cols_t.const_data_ptr<int64_t>();
  const int64_t* rptr = rptr_t.const_data_ptr<int64_t>();
  check_block_indices(cols, rptr, values.size(0), g);

  const int64_t OHp = g.OH / pool, OWp = g.OW / pool;
  at::Tensor out = empty_output(g, out_channels, OHp, OWp, out_padding, input.options());
  if (out.numel() == 0) return out;
  // 1x1 convs read the input in place, with 8 x 3 tiles when the block rows
  // allow: each k is a different channel plane, so no cache line is shared
  // between k steps and L2 bandwidth binds; 8 rows halve the input loads per
  // FMA (measured 180 vs 150 GFLOP/s at 50 %, 1 thread). Images smaller than
  // one strip go through the padded copy, whose slack the strip may run into.
  const bool pointwise = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  const bool tall_tiles = kTallTiles && pointwise && g.bo % 8 == 0;
  // The fused pool's full strips may run past an image (see the header): only the padded copy has slack.
  const bool strip_fits = g.H * g.W >= (tall_tiles ? 3 : kNV) * kW && pool == 1;
  SourceKind kind = is_padded_view(input, g) ? SourceKind::kPaddedView : SourceKind::kPhasePlanes;
  if (pointwise && g.dtype == at::kFloat && strip_fits) kind = SourceKind::kDirect;
#ifdef PYCOMPRESS_BF16_DOT
  // bf16 1x1 with even bk: bf16 products two k at a time (Bf16PairDot), weights rounded to bf16.
  if (tall_tiles && g.dtype == at::kBFloat16 && g.bk % 2 == 0 && strip_fits) kind = SourceKind::kBf16Pairs;
#endif
  if (kind == SourceKind::kDirect || kind == SourceKind::kBf16Pairs) input = input.contiguous();  // q = pixel
  const Source src = make_source(kind, input, g);
  const PlaneLayout out_layout = *plane_layout(out);
  const PlaneLayout res_layout = residual.defined() ? *plane_layout(residual) : out_layout;
  const auto dense = [&](const PlaneLayout& l) { return l.row_stride == OWp && l.plane_stride == OHp * OWp; };
  const Epilogue e{bias_t.defined() ? bias_t.const_data_ptr<float>() : nullptr,
                   relu,
                   static_cast<float>(negative_slope),
                   pool,
                   out_channels,
                   OHp * OWp,
                   out.data_ptr(),
                   out_layout,
                   g.dtype,
                   residual.defined() ? residual.const_data_ptr() : nullptr,
                   res_layout,
                   dense(out_layout) && dense(res_layout),
                   out_padding,
                   OHp,
                   OWp};
  dispatch_tiles(src, kind, tall_tiles, values, cols, rptr, g, e);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("block_sparse_conv2d", &block_sparse_conv2d_cpu);
}

}  // namespace pycompress
