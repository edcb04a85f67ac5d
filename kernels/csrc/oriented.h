// The oriented conv's shared-memory plane kernels (oriented_plane.cu: forward and input
// gradient), as oriented.cu calls them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lknets {

// Mirrored by kernels/plan.py (oriented_plane_takes): change both together.
constexpr int64_t kPlanePixels = 1024;        // staged pixels a block aims for
constexpr int64_t kMaxPlanes = 16;            // images of one channel staged per block, at most
constexpr int64_t kPlaneSmemLimit = 64 * 1024;  // shared memory of one block, at most

// A block's view of a stride-1 oriented conv on NCHW planes: the tensors' shape, the taps, the
// zero halo staged around each plane and the images of one channel staged at once.
struct PlaneGeometry {
  int n, c, h, w;
  int taps;
  int rh, rw;  // min(S / 2, side - 1)
  int hp, wp;  // the staged plane: (h + 2 rh) x (w + 2 rw)
  int planes;
};

PlaneGeometry plane_geometry(int64_t n, int64_t c, int64_t h, int64_t w, int64_t taps,
                             at::ScalarType dtype);

// Whether the plane kernels take a stride-1 conv of NCHW (n, c, h, w) tensors with `taps` taps.
bool plane_takes(int64_t n, int64_t c, int64_t h, int64_t w, int64_t taps, at::ScalarType dtype);

// dst = the gather of src through the taps: the forward (src x, with bias) or, with input_grad,
// the input gradient (src dy, offsets negated, no bias). NCHW-contiguous tensors of one shape.
void plane_gather(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& offsets,
                  const at::Tensor& bias, const at::Tensor& dst, bool input_grad);

}  // namespace lknets
