// Schemas of the detector ops: greedy NMS (torchvision semantics), per-category
// batched NMS and FM-NMS. Implementations: csrc/cpu/nms_kernel.cpp (CPU),
// csrc/cuda/nms_kernel.cu + nms_cuda.cpp (CUDA nms, batched_nms),
// kernels/nms.py (Triton fm_nms, the CUDA backend); fake kernels and public
// wrappers: pycompress/ops/nms.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  // Indices (int64) of the kept boxes, in descending score order.
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  // NMS run independently per value of idxs; kept indices in descending score order.
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  // Boolean keep mask (B, A, H, W) of the greedy FM-NMS rule (shared/METHODS.md section 3).
  m.def("fm_nms(Tensor objectness, Tensor class_probs, int kernel_size) -> Tensor");
}
