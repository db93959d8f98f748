// Fused YOLO / detection-distillation loss (Mehta & Ozturk 2018), CPU kernel.
//
// The loss of docs/yolo_loss.md, per image, over every anchor a and cell (i, j), with
// o = sigmoid(to), p = softmax(class logits), b = (sigmoid(tx), sigmoid(ty), tw, th):
//   responsible (cls >= 0, labeled image): lc ||b - box||^2 + lo (o - IoU)^2 + lk sum_c (p_c - [c = cls])^2
//   other anchors of a labeled image:      ln o^2
//   teacher terms (every anchor, teacher given): lD [(o - o_T)^2 + s lk sum_c (p_c - p_T,c)^2 + s lc ||b - b_T||^2]
// with p_T zeroed where the FM-NMS mask suppresses (o_T too with suppress_objectness) and
// s = o_T (after FM-NMS) with objectness scaling, else 1. IoU (decoded predicted box vs the
// ground truth, in grid units: the stride cancels) is a constant of the gradient.
// Gradient wrt the raw map, through the activations:
//   d/dtx = dL/dbx sx (1 - sx) (same for ty), d/dtw = dL/dbw, d/dto = dL/do o (1 - o),
//   d/dz_c = p_c (g_c - sum_k p_k g_k) with g_c = dL/dp_c (the softmax Jacobian).
//
// Algorithm: at::parallel_for over the B*A (image, anchor) planes. The map is (B, A, 5+C, H, W),
// so each channel of a plane is a contiguous run of H*W cells: the kernel vectorises across
// cells (at::vec, one lane per cell) and loops over the channels, which makes the softmax over
// C a sequence of lane-wise max / exp / sum. Per vector of cells:
//   1. the 5 box/objectness channels of student and teacher, the targets, IoU;
//   2. class max of student and teacher (C loads each);
//   3. exps once, into a per-thread scratch of 2 x C vectors, with their sums;
//   4. p, p_T, the class losses and g_c (into the scratch), sum_k p_k g_k;
//   5. the class gradients, written once.
// Memory traffic: reads the student and teacher maps once (passes 3-5 re-read the student's
// class logits from L1), the targets (cls, box converted once to the compute type: 5/(5+C) of a
// map) and the keep mask; writes the gradient once. Nothing else of map size is allocated.
// Numerics: fp32 accumulation for fp32/bf16/fp16 (fp64 for fp64), max-shifted softmax;
// per-plane losses summed in fp64 in plane order, so the result does not depend on the thread
// count. NaN in a map propagates to the loss.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "cpu/vec_io.h"

namespace pycompress {
namespace {

using at::vec::Vectorized;

template <typename Vec>
inline Vec vexp(const Vec& v) {
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    return v.exp_u20();  // ~1e-6 relative, several times faster than Sleef's u10
  } else {
    return v.exp();
  }
}

template <typename Vec>
inline Vec vsigmoid(const Vec& v) {
  return Vec(1) / (Vec(1) + vexp(-v));
}

template <typename acc_t>
struct Weights {
  acc_t coord, obj, noobj, cls, distill;  // lambda_coord, lambda_obj, lambda_noobj, lambda_cls, lambda_distill
  bool objectness_scaling, suppress_objectness;
};

// One (image, anchor) plane; returns its loss and, when g != nullptr, writes gscale * dL/d(raw).
// s, t: the plane's (5 + C, HW) raw maps (t == nullptr: no teacher). clsf, box, keepf: cls,
// (4, HW) box targets and the keep mask in acc_t (keepf == nullptr: FM-NMS off).
// scratch: 2 * C vectors.
template <typename scalar_t>
double plane_loss(const scalar_t* s, const scalar_t* t, const typename VecIo<scalar_t>::acc_t* clsf,
                  const typename VecIo<scalar_t>::acc_t* box, const typename VecIo<scalar_t>::acc_t* keepf,
                  bool labeled, typename VecIo<scalar_t>::acc_t pw, typename VecIo<scalar_t>::acc_t ph, int64_t C,
                  int64_t HW, const Weights<typename VecIo<scalar_t>::acc_t>& wt, scalar_t* g,
                  typename VecIo<scalar_t>::acc_t gscale, typename VecIo<scalar_t>::acc_t* scratch) {
  using L = VecIo<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec zero(0), one(1), half(0.5), vpw(pw), vph(ph);
  const Vec neg_inf(-std::numeric_limits<acc_t>::infinity());
  const bool has_t = t != nullptr;
  acc_t* ps = scratch;          // student exps, then p
  acc_t* pt = scratch + C * W;  // teacher exps, then g_c
  Vec total(0);
  for (int64_t j = 0; j < HW; j += W) {
    const int64_t n = std::min<int64_t>(W, HW - j);
    const auto ld = [&](const scalar_t* base, int64_t ch) { return L::load(base + ch * HW + j, n); };
    const auto lda = [&](const acc_t* base, int64_t ch) {
      return n == W ? Vec::loadu(base + ch * HW + j) : Vec::loadu(base + ch * HW + j, n);
    };
    const Vec cls = lda(clsf, 0);
    const Vec resp = labeled ? Vec::blendv(zero, one, cls >= zero) : zero;  // 1 at responsible anchors
    const Vec noobj = labeled ? one - resp : zero;
    const Vec sx = vsigmoid(ld(s, 0)), sy = vsigmoid(ld(s, 1)), tw = ld(s, 2), th = ld(s, 3);
    const Vec o = vsigmoid(ld(s, 4));
    const Vec bx = lda(box, 0), by = lda(box, 1), bw = lda(box, 2), bh = lda(box, 3);

    // IoU of the decoded prediction with the ground truth, both centred in this cell.
    const Vec w1 = vpw * vexp(tw), h1 = vph * vexp(th), w2 = vpw * vexp(bw), h2 = vph * vexp(bh);
    const Vec ix = at::vec::maximum(zero, at::vec::minimum(sx + half * w1, bx + half * w2) -
                                              at::vec::maximum(sx - half * w1, bx - half * w2));
    const Vec iy = at::vec::maximum(zero, at::vec::minimum(sy + half * h1, by + half * h2) -
                                              at::vec::maximum(sy - half * h1, by - half * h2));
    const Vec inter = ix * iy;
    const Vec iou = Vec::blendv(zero, inter / (w1 * h1 + w2 * h2 - inter), resp > zero);

    // Teacher box / objectness, after FM-NMS.
    Vec keep = one, ot = zero, sxt = zero, syt = zero, twt = zero, tht = zero, scale = one;
    if (has_t) {
      if (keepf) keep = lda(keepf, 0);
      ot = vsigmoid(ld(t, 4));
      if (keepf && wt.suppress_objectness) ot = ot * keep;
      sxt = vsigmoid(ld(t, 0)), syt = vsigmoid(ld(t, 1)), twt = ld(t, 2), tht = ld(t, 3);
      if (wt.objectness_scaling) scale = ot;
    }
    const Vec lc(wt.coord), lo(wt.obj), ln(wt.noobj), lk(wt.cls), lD(wt.distill);
    const Vec dcoord = lD * scale * lc;  // teacher box weight
    const Vec dcls = lD * scale * lk;    // teacher class weight

    // Box and objectness: loss and dL/d(activation).
    Vec lane = zero, gx, gy, gw, gh, go;
    {
      const Vec ex = sx - bx, ey = sy - by, ew = tw - bw, eh = th - bh;
      lane += resp * lc * (ex * ex + ey * ey + ew * ew + eh * eh);
      gx = resp * lc * ex, gy = resp * lc * ey, gw = resp * lc * ew, gh = resp * lc * eh;
      const Vec eo = o - iou;
      lane += resp * lo * eo * eo + noobj * ln * o * o;
      go = resp * lo * eo + noobj * ln * o;
      if (has_t) {
        const Vec fx = sx - sxt, fy = sy - syt, fw = tw - twt, fh = th - tht, fo = o - ot;
        lane += lD * fo * fo + dcoord * (fx * fx + fy * fy + fw * fw + fh * fh);
        gx += dcoord * fx, gy += dcoord * fy, gw += dcoord * fw, gh += dcoord * fh;
        go += lD * fo;
      }
    }

    // Classes: max, exps into scratch with their sums, then p, p_T, the losses and g_c.
    Vec ms = neg_inf, mt = neg_inf;
    for (int64_t c = 0; c < C; ++c) {
      ms = at::vec::maximum(ms, ld(s, 5 + c));
      if (has_t) mt = at::vec::maximum(mt, ld(t, 5 + c));
    }
    Vec zs = zero, zt = zero;
    for (int64_t c = 0; c < C; ++c) {
      const Vec es = vexp(ld(s, 5 + c) - ms);
      es.store(ps + c * W);
      zs += es;
      if (has_t) {
        const Vec et = vexp(ld(t, 5 + c) - mt);
        et.store(pt + c * W);
        zt += et;
      }
    }
    const Vec izs = one / zs;
    const Vec izt = has_t ? keep / zt : zero;  // p_T, zeroed where FM-NMS suppresses
    const Vec rk = resp * lk;
    Vec dot = zero;
    for (int64_t c = 0; c < C; ++c) {
      const Vec p = Vec::loadu(ps + c * W) * izs;
      const Vec e = p - Vec::blendv(zero, one, cls == Vec(static_cast<acc_t>(c)));
      Vec gc = rk * e;
      lane += rk * e * e;
      if (has_t) {
        const Vec f = p - Vec::loadu(pt + c * W) * izt;
        lane += dcls * f * f;
        gc += dcls * f;
      }
      p.store(ps + c * W);
      gc.store(pt + c * W);
      dot += p * gc;
    }
    total += n == W ? lane : Vec::set(zero, lane, n);
    if (!g) continue;

    // Gradient: every squared error's derivative is 2 x error; gscale divides by the reduction.
    const Vec k2(2 * gscale);
    const auto st = [&](int64_t ch, const Vec& v) { L::store(g + ch * HW + j, v, n); };
    st(0, k2 * gx * sx * (one - sx));
    st(1, k2 * gy * sy * (one - sy));
    st(2, k2 * gw);
    st(3, k2 * gh);
    st(4, k2 * go * o * (one - o));
    for (int64_t c = 0; c < C; ++c) {
      const Vec p = Vec::loadu(ps + c * W);
      st(5 + c, k2 * p * (Vec::loadu(pt + c * W) - dot));
    }
  }
  return static_cast<double>(at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, total));
}

std::tuple<at::Tensor, at::Tensor> detection_distill_loss_cpu(
    const at::Tensor& student_in, const std::optional<at::Tensor>& teacher_opt, const std::optional<at::Tensor>& keep_opt,
    const at::Tensor& anchors_in, const at::Tensor& cls_in, const at::Tensor& box_in, const at::Tensor& labeled_in,
    bool objectness_scaling, bool suppress_objectness, double lambda_distill, double lambda_coord, double lambda_obj,
    double lambda_noobj, double lambda_cls, c10::string_view reduction, bool compute_grad) {
  constexpr const char* op = "pycompress::detection_distill_loss";
  TORCH_CHECK_VALUE(student_in.dim() == 5 && student_in.size(2) >= 6, op,
                    ": student must be (B, A, 5 + C, H, W) with C >= 1, got ", student_in.sizes());
  const int64_t B = student_in.size(0), A = student_in.size(1), C = student_in.size(2) - 5;
  const int64_t H = student_in.size(3), Wd = student_in.size(4), HW = H * Wd;
  const bool has_t = teacher_opt.has_value() && teacher_opt->defined();
  const bool has_keep = keep_opt.has_value() && keep_opt->defined();
  TORCH_CHECK_VALUE(reduction == "none" || reduction == "sum" || reduction == "mean", op,
                    ": reduction must be one of none, sum, mean, got '", reduction, "'");
  if (has_t) {
    TORCH_CHECK_VALUE(teacher_opt->sizes() == student_in.sizes(), op, ": teacher ", teacher_opt->sizes(),
                      " must have the student's shape ", student_in.sizes());
    TORCH_CHECK_TYPE(teacher_opt->scalar_type() == student_in.scalar_type(), op, ": teacher (",
                     teacher_opt->scalar_type(), ") must have the student's dtype (", student_in.scalar_type(), ")");
  }
  TORCH_CHECK_VALUE(!has_keep || has_t, op, ": keep (the teacher's FM-NMS mask) needs a teacher");
  const std::vector<int64_t> cell_shape{B, A, H, Wd};
  if (has_keep) {
    TORCH_CHECK_VALUE(keep_opt->sizes() == at::IntArrayRef(cell_shape), op, ": keep ", keep_opt->sizes(),
                      " must be (B, A, H, W) = ", at::IntArrayRef(cell_shape));
  }
  TORCH_CHECK_VALUE(anchors_in.dim() == 2 && anchors_in.size(0) == A && anchors_in.size(1) == 2, op,
                    ": anchors must be (A, 2) = (", A, ", 2), got ", anchors_in.sizes());
  TORCH_CHECK_VALUE(cls_in.sizes() == at::IntArrayRef(cell_shape), op, ": cls ", cls_in.sizes(),
                    " must be (B, A, H, W) = ", at::IntArrayRef(cell_shape));
  TORCH_CHECK_TYPE(cls_in.scalar_type() == at::kLong, op, ": cls must be int64, got ", cls_in.scalar_type());
  TORCH_CHECK_VALUE(box_in.sizes() == at::IntArrayRef({B, A, 4, H, Wd}), op, ": box ", box_in.sizes(),
                    " must be (B, A, 4, H, W)");
  TORCH_CHECK_VALUE(labeled_in.dim() == 1 && labeled_in.size(0) == B, op, ": labeled must be (B,) = (", B,
                    ",), got ", labeled_in.sizes());
  TORCH_CHECK_TYPE(labeled_in.scalar_type() == at::kBool, op, ": labeled must be bool, got ",
                   labeled_in.scalar_type());

  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = has_t ? teacher_opt->contiguous() : at::Tensor();
  const at::Tensor labeled = labeled_in.contiguous();
  at::Tensor grad = compute_grad ? at::empty(student.sizes(), student.options()) : at::Tensor();
  std::vector<double> plane(B * A, 0.0);
  const double gscale = reduction == "mean" ? (B > 0 ? 1.0 / B : 0.0) : 1.0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "detection_distill_loss_cpu", [&] {
    using acc_t = typename VecIo<scalar_t>::acc_t;
    constexpr int64_t W = Vectorized<acc_t>::size();
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    // The targets and the mask in the compute type: every lane op is then a vector op.
    const at::Tensor clsf = cls_in.to(acc_type).contiguous();
    const at::Tensor box = box_in.to(acc_type).contiguous();
    const at::Tensor keepf = has_keep ? keep_opt->to(acc_type).contiguous() : at::Tensor();
    const at::Tensor anchors = anchors_in.to(at::kDouble).contiguous();
    const double* an = anchors.const_data_ptr<double>();
    const Weights<acc_t> wt{static_cast<acc_t>(lambda_coord), static_cast<acc_t>(lambda_obj),
                            static_cast<acc_t>(lambda_noobj),  static_cast<acc_t>(lambda_cls),
                            static_cast<acc_t>(lambda_distill), objectness_scaling, suppress_objectness};
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = has_t ? teacher.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* cf = clsf.const_data_ptr<acc_t>();
    const acc_t* bf = box.const_data_ptr<acc_t>();
    const acc_t* kf = has_keep ? keepf.const_data_ptr<acc_t>() : nullptr;
    const bool* lab = labeled.const_data_ptr<bool>();
    scalar_t* g = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const int64_t plane_elems = (5 + C) * HW;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, plane_elems));
    at::parallel_for(0, B * A, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(2 * C * W);
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / A, a = u % A;
        plane[u] = plane_loss<scalar_t>(s + u * plane_elems, t ? t + u * plane_elems : nullptr, cf + u * HW,
                                        bf + u * 4 * HW, kf ? kf + u * HW : nullptr, lab[b],
                                        static_cast<acc_t>(an[2 * a]), static_cast<acc_t>(an[2 * a + 1]), C, HW, wt,
                                        g ? g + u * plane_elems : nullptr, static_cast<acc_t>(gscale), scratch.data());
      }
    });
  });

  std::vector<double> image(B, 0.0);
  for (int64_t u = 0; u < B * A; ++u) image[u / A] += plane[u];
  at::Tensor loss;
  if (reduction == "none") {
    loss = at::empty({B}, at::kDouble);
    std::copy(image.begin(), image.end(), loss.data_ptr<double>());
    loss = loss.to(student.scalar_type());
  } else {
    double total = 0;
    for (double v : image) total += v;
    loss = at::scalar_tensor(total * gscale, student.options());
  }
  return {loss, compute_grad ? grad : at::empty({0}, student.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pycompress, CPU, m) { m.impl("detection_distill_loss", &detection_distill_loss_cpu); }

}  // namespace pycompress
