// Schema of the fused YOLO / detection-distillation loss (docs/yolo_loss.md).
// Implementations: csrc/cpu/detection_loss_kernel.cpp (CPU), kernels/detection_loss.py
// (Triton, CUDA); fake and autograd registrations: pycompress/ops/detection_loss.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  // student, teacher: raw maps (B, A, 5 + C, H, W); teacher None = the plain YOLO loss.
  // keep: the teacher's FM-NMS mask (B, A, H, W) bool, None = FM-NMS off.
  // cls (B, A, H, W) int64 (-1 = not responsible), box (B, A, 4, H, W), labeled (B,) bool.
  // Returns (loss, grad): the reduced loss ((B,) per image for reduction="none") and, when
  // compute_grad, d(loss)/d(student) already divided by the reduction's denominator, so
  // backward only multiplies by the incoming gradient.
  m.def(
      "detection_distill_loss(Tensor student, Tensor? teacher, Tensor? keep, Tensor anchors, Tensor cls, "
      "Tensor box, Tensor labeled, bool objectness_scaling, bool suppress_objectness, float lambda_distill, "
      "float lambda_coord, float lambda_obj, float lambda_noobj, float lambda_cls, str reduction, "
      "bool compute_grad) -> (Tensor, Tensor)");
}
