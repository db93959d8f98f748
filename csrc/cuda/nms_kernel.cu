// Greedy NMS and per-category batched NMS, CUDA kernels (bitmask algorithm).
//
// Input: the boxes already in stable descending score order (the binding,
// nms_cuda.cpp, sorts and gathers them) and, for batched NMS, their categories.
//   1. overlap_mask_kernel: boxes in tiles of 64; block (row tile, column tile)
//      with 64 threads. Thread i computes one 64-bit word: bit j is set when the
//      later box j of the column tile has IoU with box i above the threshold
//      (and, for batched NMS, the same category). Only tiles on or above the
//      diagonal are computed, the only ones the reduction reads.
//   2. reduce_kernel, one block: tile by tile, one thread walks the tile's 64
//      boxes in order (a box is kept unless a bit marks it removed, and a kept
//      box ORs its own tile's word in); then all threads OR the kept boxes'
//      words into the removed words of the later tiles. One barrier per tile,
//      not per box, and the mask never leaves the device.
// Memory: the mask is n * ceil(n / 64) words (1.25 GB at 100k boxes, as in
// torchvision's CUDA kernel); each word is written once and read at most once.
// Numerics: the IoU of nms_math.h with __f*_rn / __d*_rn arithmetic (no FMA
// contraction), so results match the CPU kernel and torchvision's CPU nms to
// the bit; float boxes compare against nm::float_threshold(thr).
// No torch headers: raw pointers and the caller's stream.
#include <cuda_runtime.h>

#include <cstdint>

#include "nms_math.h"

namespace pycompress {
namespace nms_kernel {
namespace {

namespace nm = nms_math;
constexpr int kTile = nm::kTileBoxes;

template <typename T>
__global__ void overlap_mask_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ category, int64_t n,
                                    T thr, int64_t tiles, uint64_t* __restrict__ mask) {
  using Ops = nm::ScalarOps<T>;
  const int64_t row_tile = blockIdx.y, col_tile = blockIdx.x;
  if (col_tile < row_tile) return;
  const int rows = static_cast<int>(n - row_tile * kTile < kTile ? n - row_tile * kTile : kTile);
  const int cols = static_cast<int>(n - col_tile * kTile < kTile ? n - col_tile * kTile : kTile);

  __shared__ T cb[kTile][5];
  __shared__ int64_t cc[kTile];
  const int t = threadIdx.x;
  if (t < cols) {
    const T* b = boxes + 4 * (col_tile * kTile + t);
    cb[t][0] = b[0];
    cb[t][1] = b[1];
    cb[t][2] = b[2];
    cb[t][3] = b[3];
    cb[t][4] = nm::box_area<Ops>(b[0], b[1], b[2], b[3]);
    cc[t] = category ? category[col_tile * kTile + t] : 0;
  }
  __syncthreads();
  if (t >= rows) return;

  const int64_t i = row_tile * kTile + t;
  const T* bi = boxes + 4 * i;
  const T ix1 = bi[0], iy1 = bi[1], ix2 = bi[2], iy2 = bi[3];
  const T ia = nm::box_area<Ops>(ix1, iy1, ix2, iy2);
  const int64_t ci = category ? category[i] : 0;
  uint64_t bits = 0;
  for (int j = row_tile == col_tile ? t + 1 : 0; j < cols; ++j) {
    if (cc[j] != ci) continue;
    const T inter = nm::box_inter<Ops>(ix1, iy1, ix2, iy2, cb[j][0], cb[j][1], cb[j][2], cb[j][3]);
    if (nm::box_iou_from_inter<Ops>(inter, ia, cb[j][4]) > thr) bits |= uint64_t(1) << j;
  }
  mask[i * tiles + col_tile] = bits;
}

__global__ void reduce_kernel(const uint64_t* __restrict__ mask, int64_t n, int64_t tiles, uint64_t* removed,
                              uint64_t* __restrict__ keep_words) {
  __shared__ uint64_t kept_bits;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    if (threadIdx.x == 0) {
      uint64_t rem = removed[tile], kept = 0;
      const int boxes = static_cast<int>(n - tile * kTile < kTile ? n - tile * kTile : kTile);
      for (int b = 0; b < boxes; ++b) {
        if ((rem >> b) & 1) continue;
        kept |= uint64_t(1) << b;
        rem |= mask[(tile * kTile + b) * tiles + tile];
      }
      keep_words[tile] = kept;
      kept_bits = kept;
    }
    __syncthreads();
    const uint64_t kept = kept_bits;
    for (int64_t w = tile + 1 + threadIdx.x; w < tiles; w += blockDim.x) {
      uint64_t acc = removed[w];
      for (uint64_t k = kept; k; k &= k - 1) acc |= mask[(tile * kTile + __ffsll(static_cast<long long>(k)) - 1) * tiles + w];
      removed[w] = acc;
    }
    __syncthreads();
  }
}

}  // namespace

// sorted_boxes: (n, 4) in descending score order; category: n entries or nullptr.
// mask: n * ceil(n/64) words of scratch; removed: ceil(n/64) words of scratch;
// keep_words: ceil(n/64) words out, bit b of word t set when sorted box 64t+b is kept.
template <typename T>
cudaError_t nms_bitmask_launch(const T* sorted_boxes, const int64_t* category, int64_t n, T thr, uint64_t* mask,
                               uint64_t* removed, uint64_t* keep_words, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t tiles = nm::num_tiles(n);
  if (tiles > 65535) return cudaErrorInvalidValue;  // grid y limit: n <= 4.19M boxes
  cudaError_t err = cudaMemsetAsync(removed, 0, tiles * sizeof(uint64_t), stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  overlap_mask_kernel<T><<<grid, kTile, 0, stream>>>(sorted_boxes, category, n, thr, tiles, mask);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_kernel<<<1, 256, 0, stream>>>(mask, n, tiles, removed, keep_words);
  return cudaGetLastError();
}

template cudaError_t nms_bitmask_launch<float>(const float*, const int64_t*, int64_t, float, uint64_t*, uint64_t*,
                                               uint64_t*, cudaStream_t);
template cudaError_t nms_bitmask_launch<double>(const double*, const int64_t*, int64_t, double, uint64_t*,
                                                uint64_t*, uint64_t*, cudaStream_t);

}  // namespace nms_kernel
}  // namespace pycompress
