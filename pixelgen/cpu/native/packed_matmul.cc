// packed_matmul: y[m, n] = x[m, k] · w[k, n] for the few rows of a decoding step, with w
// packed panel by panel ([panels, k, kPanel], pixelgen/cpu/packed_matmul.py).
//
// Why: a decoding step multiplies 1-8 rows by every weight matrix of the model once, so it
// is bound by how fast the weights stream in. XLA:CPU's library reads a row-major [k, n]
// matrix in column tiles, a strided walk; packed, each panel of kPanel columns is one
// contiguous run of k · kPanel floats, and this kernel walks it in order: per k, one panel
// row (kVectors vectors) times a broadcast of each x row, into kVectors · rows accumulators
// held in registers. `python benchmarks/decode_floor.py --split halves packed` compares the two.
//
// Sums run over k in order, one fp32 FMA chain per output (no reassociation), so the result
// is deterministic: both decoding parties (pixelgen.cpu.core_split) get the same bits from the
// same inputs.
#include <cstdint>
#include <cstring>

#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using pixelgen::kLanes, pixelgen::Load, pixelgen::Store, pixelgen::Vec;

// Per panel row, kVectors vectors: 4 with AVX-512 (32 registers: 16 accumulators, 4 panel
// vectors), else 2 (AVX2's 16 registers: 8 accumulators, 2 panel vectors).
constexpr int kVectors = kLanes == 16 ? 4 : 2;
constexpr int kPanel = kLanes * kVectors;  // columns per panel
constexpr int kRows = 4;                   // rows per pass over a panel

// y[0:M, j0:j0+width] = x[0:M, :] · panel, panel [k, kPanel] contiguous; width <= kPanel.
template <int M>
void PanelRows(int64_t k, int64_t x_stride, int64_t y_stride, const float* __restrict x,
               const float* __restrict panel, float* __restrict y, int64_t width) {
  Vec acc[M][kVectors];
  PIXELGEN_UNROLL
  for (int r = 0; r < M; ++r)
    PIXELGEN_UNROLL
    for (int c = 0; c < kVectors; ++c) acc[r][c] = Vec{};
  const float* w = panel;
  for (int64_t i = 0; i < k; ++i, w += kPanel) {
    Vec wv[kVectors];
    PIXELGEN_UNROLL
    for (int c = 0; c < kVectors; ++c) wv[c] = Load(w + c * kLanes);
    PIXELGEN_UNROLL
    for (int r = 0; r < M; ++r) {
      const float a = x[r * x_stride + i];
      PIXELGEN_UNROLL
      for (int c = 0; c < kVectors; ++c) acc[r][c] += a * wv[c];
    }
  }
  for (int r = 0; r < M; ++r) {
    if (width == kPanel) {
      PIXELGEN_UNROLL
      for (int c = 0; c < kVectors; ++c) Store(y + r * y_stride + c * kLanes, acc[r][c]);
    } else {  // the last panel of a matrix whose n is not a multiple of kPanel
      float full[kPanel];
      for (int c = 0; c < kVectors; ++c) Store(full + c * kLanes, acc[r][c]);
      std::memcpy(y + r * y_stride, full, width * sizeof(float));
    }
  }
}

ffi::Error PackedMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> packed,
                            ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || yd.size() != 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "packed_matmul: expected x [m, k], packed [panels, k, panel], y [m, n]");
  }
  const int64_t m = xd[0], k = xd[1], panels = pd[0], n = yd[1];
  if (pd[1] != k || pd[2] != kPanel || yd[0] != m || n > panels * kPanel ||
      n <= (panels - 1) * kPanel) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "packed_matmul: shapes do not match (x [m, k], packed [ceil(n / panel), "
                      "k, panel] with this library's panel width, y [m, n])");
  }
  const float* xs = x.typed_data();
  const float* ws = packed.typed_data();
  float* ys = y->typed_data();
  for (int64_t p = 0; p < panels; ++p) {
    const float* panel = ws + p * k * kPanel;
    const int64_t j0 = p * kPanel;
    const int64_t width = n - j0 < kPanel ? n - j0 : kPanel;
    for (int64_t r0 = 0; r0 < m; r0 += kRows) {
      const float* xr = xs + r0 * k;
      float* yr = ys + r0 * n + j0;
      switch (m - r0 < kRows ? m - r0 : kRows) {
        case 1: PanelRows<1>(k, k, n, xr, panel, yr, width); break;
        case 2: PanelRows<2>(k, k, n, xr, panel, yr, width); break;
        case 3: PanelRows<3>(k, k, n, xr, panel, yr, width); break;
        default: PanelRows<4>(k, k, n, xr, panel, yr, width); break;
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PixelgenPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The panel width this build packs for (it depends on the vector width it was compiled for).
extern "C" int64_t pixelgen_packed_matmul_panel() { return kPanel; }
