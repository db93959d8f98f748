// Schema of the block-sparse (BSR) convolution. Implementations:
// csrc/cpu/block_sparse_kernel.cpp (CPU), kernels/block_sparse.py (Triton, CUDA);
// fake and autograd registrations: pycompress/ops/block_sparse.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  // out = maxpool_p(act(conv2d(input, W) + bias + residual)), W being the GEMM view
  // (out_channels, in_channels * kh * kw) of the weight stored as BSR:
  //   values  (nnzb, bk, bo)  nonzero blocks, each stored k-major (transposed),
  //   col_idx (nnzb,) int64   block column of each block (units of bk),
  //   row_ptr (R + 1,) int64  blocks of block row r are [row_ptr[r], row_ptr[r+1]).
  // R * bo may exceed out_channels (the last block row is padded); bk must
  // divide in_channels * kh * kw. Linear layers are the 1x1 case. residual, when
  // given, has the conv output's shape and the input's dtype (a ResNet's shortcut).
  // act is the identity, or when relu max(x, 0) + negative_slope * min(x, 0)
  // (ReLU, or LeakyReLU; negative_slope >= 0). pool = p > 1 max-pools p x p with
  // stride p (floor mode, as nn.MaxPool2d(p)) in the store; not with a residual.
  // out_padding = q > 0 changes only the output's layout: it is then the interior
  // of planes with q zero pixels on every side (strides (C*Hb*Wb, Hb*Wb, Wb, 1),
  // Hb = OH + 2q, Wb = OW + 2q, storage offset q*Wb + q, then 2*Wb + 128 elements
  // of slack), which a stride-1 conv of padding q reads in place instead of
  // copying it into a padded buffer.
  m.def(
      "block_sparse_conv2d(Tensor input, Tensor values, Tensor col_idx, Tensor row_ptr, Tensor? bias, "
      "int[2] kernel, int[2] stride, int[2] padding, int[2] dilation, int out_channels, bool relu, "
      "Tensor? residual=None, float negative_slope=0., int pool=1, int out_padding=0) -> Tensor");
}
