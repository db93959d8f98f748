// Torch binding of the CUDA NMS kernels (nms_kernel.cu), built only with a CUDA
// torch. Sorts the scores on the device (stable, descending: torchvision's
// order), gathers the boxes in that order in the compute dtype (float for
// fp32/fp16/bf16, double for fp64), launches the bitmask kernels on the current
// stream and turns the device-side keep bits into indices, also on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "nms_math.h"

namespace pycompress {
// Defined in nms_kernel.cu. The namespace is not nms_cuda: that name is the
// op's function below, and `&nms_cuda` would be ambiguous.
namespace nms_kernel {
template <typename T>
cudaError_t nms_bitmask_launch(const T* sorted_boxes, const int64_t* category, int64_t n, T thr, uint64_t* mask,
                               uint64_t* removed, uint64_t* keep_words, cudaStream_t stream);
}  // namespace nms_kernel

namespace {

at::Tensor nms_cuda_impl(const char* op, const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                         double iou_threshold) {
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, "pycompress::", op,
                    ": boxes should be a 2d tensor of shape (N, 4), got ", boxes.sizes());
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) == boxes.size(0), "pycompress::", op,
                    ": scores should be a 1d tensor with one entry per box, got ", scores.sizes());
  TORCH_CHECK_TYPE(boxes.scalar_type() == scores.scalar_type(), "pycompress::", op, ": boxes (", boxes.scalar_type(),
                   ") and scores (", scores.scalar_type(), ") should have the same dtype");
  TORCH_CHECK_TYPE(at::isFloatingType(boxes.scalar_type()), "pycompress::", op,
                   ": boxes should be a floating-point tensor, got ", boxes.scalar_type());
  c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));

  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const bool fp64 = boxes.scalar_type() == at::kDouble;
  const at::Tensor sorted = boxes.index_select(0, order).to(fp64 ? at::kDouble : at::kFloat).contiguous();
  at::Tensor category;
  if (idxs) category = idxs->index_select(0, order).to(at::kLong).contiguous();
  const int64_t tiles = nms_math::num_tiles(n);
  const auto words = boxes.options().dtype(at::kLong);
  at::Tensor mask = at::empty({n * tiles}, words);
  at::Tensor removed = at::empty({tiles}, words);
  at::Tensor keep_words = at::empty({tiles}, words);
  const int64_t* cat = category.defined() ? category.const_data_ptr<int64_t>() : nullptr;
  auto* m = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  auto* r = reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>());
  auto* k = reinterpret_cast<uint64_t*>(keep_words.data_ptr<int64_t>());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err =
      fp64 ? nms_kernel::nms_bitmask_launch<double>(sorted.const_data_ptr<double>(), cat, n, iou_threshold, m, r, k, stream)
           : nms_kernel::nms_bitmask_launch<float>(sorted.const_data_ptr<float>(), cat, n,
                                                 nms_math::float_threshold(iou_threshold), m, r, k, stream);
  TORCH_CHECK(err == cudaSuccess, "pycompress::", op, ": CUDA kernel failed: ", cudaGetErrorString(err));

  // Bit b of word t is sorted position 64 t + b.
  const at::Tensor shifts = at::arange(nms_math::kTileBoxes, words);
  const at::Tensor kept = keep_words.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and(1).reshape({-1}).slice(0, 0, n);
  return order.masked_select(kept.to(at::kBool));
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  return nms_cuda_impl("nms", boxes, scores, nullptr, iou_threshold);
}

at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold) {
  TORCH_CHECK_VALUE(idxs.dim() == 1 && idxs.size(0) == boxes.size(0), "pycompress::batched_nms: idxs should be a ",
                    "1d tensor with one entry per box (", boxes.size(0), "), got shape ", idxs.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(idxs.scalar_type()) && !at::isComplexType(idxs.scalar_type()),
                   "pycompress::batched_nms: idxs should be an integer tensor, got ", idxs.scalar_type());
  return nms_cuda_impl("batched_nms", boxes, scores, &idxs, iou_threshold);
}

}  // namespace

TORCH_LIBRARY_IMPL(pycompress, CUDA, m) {
  m.impl("nms", &nms_cuda);
  m.impl("batched_nms", &batched_nms_cuda);
}

}  // namespace pycompress
