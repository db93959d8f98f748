// Schema of the fused knowledge-distillation loss. Implementations:
// csrc/cpu/kd_loss_kernel.cpp (CPU), kernels/kd_loss.py (Triton, CUDA);
// fake and autograd registrations: pycompress/ops/kd_loss.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  // Returns (loss, grad): the reduced loss (per row for reduction="none") and,
  // when compute_grad, d(loss)/d(student) already divided by the reduction's
  // denominator, so backward only multiplies by the incoming gradient.
  m.def(
      "kd_loss(Tensor student, Tensor teacher, Tensor? target, float temperature, "
      "str divergence, float beta, float alpha, bool t2_scale, str reduction, "
      "int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
  // The same loss with a sparse teacher: k (value, index) pairs per row.
  // tail="bucket" keeps the teacher's remaining mass as one class; "drop" renormalises
  // both distributions over the k classes. See csrc/cpu/kd_loss_kernel.cpp.
  m.def(
      "kd_loss_topk(Tensor student, Tensor teacher_values, Tensor teacher_indices, Tensor? target, "
      "float temperature, str divergence, float beta, float alpha, bool t2_scale, str reduction, "
      "int ignore_index, str tail, bool compute_grad) -> (Tensor, Tensor)");
  // The CPU kernel's compute floor for benchmarks: its exponentials of student / T and
  // teacher / T alone, from L1 (no memory traffic). Returns their sum (fp64, 0-dim).
  m.def("_kd_loss_exp_floor(Tensor student, Tensor teacher, float temperature) -> Tensor");
}
