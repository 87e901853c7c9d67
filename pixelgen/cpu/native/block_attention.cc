// block_attention: softmax attention over the (query block, key block) pairs of a block-sparse
// plan, fused as flash attention does it: the logits of one 32 × 32 block pair are made,
// normalised and used while they sit in the core's caches, and never reach memory.
//
// Why: XLA:CPU computes block-sparse attention (pixelgen/nn/block_sparse.py) as batched
// matmuls whose [.., 32, K] logits go through memory between a dozen ops, and its small
// batched products with a 32-wide contraction ran at a third to a half of the matmul peak
// (`benchmarks/README.md`). Here every block product is one register-blocked micro-kernel
// (`Product`), and the softmax, the mask and the backward pass's element-wise steps run on
// the block in cache.
//
// The plan (pixelgen/cpu/native_attention.py) lists, for each query block i, its key blocks
// j (row_start[i] .. row_start[i + 1] in key_block) and the mask of each pair (mask_id: an
// index into masks [count, 32 keys, 32 queries] of 0/1, or -1 where the whole pair is
// allowed). Tensors are
// [batch, length, heads, head_dim] as the projections make them (no transposes around the
// call); the (batch row, head) slices are independent and run in parallel on XLA's intra-op
// thread pool. The backward pass recomputes each block's probabilities from the forward's
// log-sum-exp (FlashAttention-2), so it stores nothing of size length².
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using pixelgen::IVec, pixelgen::kLanes, pixelgen::Load, pixelgen::Splat, pixelgen::Store,
    pixelgen::Vec;

// Accumulator blocks of kRows × 32 floats: 8 × 2 vectors of AVX-512's 32 registers, or 2 × 4 of
// AVX2's 16.
constexpr int kRows = kLanes == 16 ? 8 : 2;
constexpr int kBlock = 32;                   // queries per query block, keys per key block
constexpr int kVecs = kBlock / kLanes;       // vectors per 32 floats
constexpr int kPairs = kBlock * kBlock;      // logits per block pair
constexpr float kMasked = -1e30f;            // a masked logit: never a maximum, exp 0

// e^x in float32, elementwise (Cephes' expf: 2^n · e^r, |r| <= ln 2 / 2, degree-6 polynomial;
// within 2 ulp), and exactly 0 below -87: a masked logit (kMasked) gets no weight.
inline Vec Exp(Vec x) {
  const auto underflow = x < Splat(-87.0f);
  x = underflow ? Splat(-87.0f) : x;
  x = x > Splat(88.0f) ? Splat(88.0f) : x;
  const Vec t = x * 1.44269504088896341f + 0.5f;
  Vec n = __builtin_convertvector(__builtin_convertvector(t, IVec), Vec);
  n = n > t ? n - 1.0f : n;  // floor(t): round(x / ln 2)
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(Vec));
  return underflow ? Vec{} : p * scale;
}

// c[32, n] (+)= a[32, k] · b[k, n], n a multiple of 32. a's element (row, l) is at
// a[row · a_row + l · a_col] (a_col = 1: row-major; a_row = 1: a read transposed); b and c
// are row-major with row strides b_row and c_row. kRows rows × 32 columns of c are held in
// registers across the whole k loop, and pass through finish(row, column, vector) on their
// way out.
struct Keep {
  Vec operator()(int, int64_t, Vec x) const { return x; }
};

template <typename Finish = Keep>
void Product(int64_t k, int64_t n, const float* __restrict a, int64_t a_row, int64_t a_col,
             const float* __restrict b, int64_t b_row, float* __restrict c, int64_t c_row,
             bool accumulate, const Finish& finish = Finish()) {
  for (int64_t col = 0; col < n; col += kBlock) {
    for (int row = 0; row < kBlock; row += kRows) {
      Vec acc[kRows][kVecs];
      PIXELGEN_UNROLL
      for (int r = 0; r < kRows; ++r)
        PIXELGEN_UNROLL
        for (int v = 0; v < kVecs; ++v)
          acc[r][v] = accumulate ? Load(c + (row + r) * c_row + col + v * kLanes) : Vec{};
      const float* ar = a + row * a_row;
      for (int64_t l = 0; l < k; ++l) {
        Vec bv[kVecs];
        PIXELGEN_UNROLL
        for (int v = 0; v < kVecs; ++v) bv[v] = Load(b + l * b_row + col + v * kLanes);
        PIXELGEN_UNROLL
        for (int r = 0; r < kRows; ++r) {
          const float s = ar[r * a_row + l * a_col];
          PIXELGEN_UNROLL
          for (int v = 0; v < kVecs; ++v) acc[r][v] += s * bv[v];
        }
      }
      PIXELGEN_UNROLL
      for (int r = 0; r < kRows; ++r)
        PIXELGEN_UNROLL
        for (int v = 0; v < kVecs; ++v)
          Store(c + (row + r) * c_row + col + v * kLanes,
                finish(row + r, col + v * kLanes, acc[r][v]));
    }
  }
}

// A block pair's logits, transposed: logits[key, query] = k_block[key] · q_panel[:, query]
// (q_panel [d, 32], the block's queries transposed), kMasked where `mask` [32 keys, 32
// queries] (nullptr: none) is 0. With `top`, also each query's largest logit. Transposed, a
// query's statistics are one lane of a vector, so its max and sum run down the key rows.
void Logits(int64_t d, const float* k_block, const float* q_panel, const float* mask,
            float* logits, Vec* top = nullptr) {
  if (top != nullptr)
    for (int v = 0; v < kVecs; ++v) top[v] = Splat(kMasked);
  Product(d, kBlock, k_block, d, 1, q_panel, kBlock, logits, kBlock, false,
          [mask, top](int key, int64_t column, Vec x) {
            if (mask != nullptr)
              x = Load(mask + key * kBlock + column) > Splat(0.5f) ? x : Splat(kMasked);
            if (top != nullptr) {
              Vec& t = top[column / kLanes];
              t = x > t ? x : t;
            }
            return x;
          });
}

// The plan and the shapes of one call, checked.
struct Plan {
  const int32_t* row_start;  // [query_blocks + 1]
  const int32_t* key_block;  // [pairs]
  const int32_t* mask_id;    // [pairs]; -1: every pair allowed
  const float* masks;        // [count, 32 keys, 32 queries] of 0 / 1 (transposed)
  int64_t slices, length, heads, dim, blocks;
};

ffi::Error Check(ffi::AnyBuffer::Dimensions dims, ffi::Buffer<ffi::S32> row_start,
                 ffi::Buffer<ffi::S32> key_block, ffi::Buffer<ffi::S32> mask_id,
                 ffi::Buffer<ffi::F32> masks, Plan* plan) {
  if (dims.size() < 3) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "block_attention: q, k, v must be [..., length, heads, head_dim]");
  }
  const int64_t length = dims[dims.size() - 3], heads = dims[dims.size() - 2],
                dim = dims[dims.size() - 1];
  int64_t batch = 1;
  for (size_t i = 0; i + 3 < dims.size(); ++i) batch *= dims[i];
  if (length % kBlock || dim % kBlock || dim == 0) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "block_attention: length and head_dim must be multiples of 32");
  }
  const int64_t blocks = length / kBlock;
  const auto md = masks.dimensions();
  if (static_cast<int64_t>(row_start.element_count()) != blocks + 1 ||
      key_block.element_count() != mask_id.element_count() || md.size() != 3 ||
      md[1] != kBlock || md[2] != kBlock) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "block_attention: the plan does not match the sequence length");
  }
  const int32_t* starts = row_start.typed_data();
  const int32_t* keys = key_block.typed_data();
  const int32_t* ids = mask_id.typed_data();
  const int64_t pairs = key_block.element_count();
  if (starts[0] != 0 || starts[blocks] != pairs) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "block_attention: bad row_start");
  }
  for (int64_t i = 0; i < blocks; ++i) {
    if (starts[i + 1] < starts[i]) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "block_attention: bad row_start");
    }
  }
  for (int64_t e = 0; e < pairs; ++e) {
    if (keys[e] < 0 || keys[e] >= blocks || ids[e] < -1 || ids[e] >= md[0]) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "block_attention: a key block or mask index is out of range");
    }
  }
  *plan = Plan{starts, keys, ids, masks.typed_data(), batch * heads, length, heads, dim, blocks};
  return ffi::Error::Success();
}

// Runs body(slice) for every slice in [0, count), on the calling thread and on the pool's
// threads, and returns when all are done. Slices are claimed one at a time, so a helper that
// starts late (its thread busy with another op) finds nothing left and returns at once.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, count, &body] {
    for (int64_t i; (i = state->next.fetch_add(1)) < count;) {
      body(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();  // a helper reads body only while a slice is left unclaimed
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

// The rows [length, dim] of (batch row, head) slice s of x [.., length, heads, dim], times
// scale.
void ReadRows(const float* x, const Plan& p, int64_t s, float scale, float* rows) {
  const int64_t b = s / p.heads, h = s % p.heads, stride = p.heads * p.dim;
  const float* base = x + b * p.length * stride + h * p.dim;
  for (int64_t t = 0; t < p.length; ++t)
    for (int64_t e = 0; e < p.dim; ++e) rows[t * p.dim + e] = base[t * stride + e] * scale;
}

void WriteRows(const float* rows, const Plan& p, int64_t s, float* x) {
  const int64_t b = s / p.heads, h = s % p.heads, stride = p.heads * p.dim;
  float* base = x + b * p.length * stride + h * p.dim;
  for (int64_t t = 0; t < p.length; ++t)
    std::memcpy(base + t * stride, rows + t * p.dim, p.dim * sizeof(float));
}

// rows [length, dim] as block panels [blocks, dim, 32]: each block of 32 rows transposed.
void MakePanels(const float* rows, const Plan& p, float* panels) {
  for (int64_t j = 0; j < p.blocks; ++j)
    for (int t = 0; t < kBlock; ++t)
      for (int64_t e = 0; e < p.dim; ++e)
        panels[(j * p.dim + e) * kBlock + t] = rows[(j * kBlock + t) * p.dim + e];
}

std::unique_ptr<float[]> Scratch(int64_t floats) { return std::unique_ptr<float[]>(new float[floats]); }

// A block pair's logits are computed transposed, [32 keys, 32 queries]: each query's softmax
// statistics are then vectors over queries, and its max and sum run down the key rows.

// Forward of (batch row, head) slice s: out [.., length, heads, dim], lse [.., heads, length]
// (the log-sum-exp of each query's allowed logits, q scaled by `scale`).
void ForwardSlice(const Plan& p, int64_t s, float scale, const float* qs, const float* ks,
                  const float* vs, float* outs, float* lses) {
  const int64_t n = p.length, d = p.dim;
  auto buffer = Scratch(4 * n * d + kPairs + kBlock * d);
  float* qr = buffer.get();       // q · scale, rows; then the output rows
  float* qp = qr + n * d;         // q · scale, panels
  float* kr = qp + n * d;         // key rows
  float* vr = kr + n * d;         // value rows
  float* probs = vr + n * d;      // [32 keys, 32 queries]: logits, then probabilities
  float* acc = probs + kPairs;    // [32 queries, d]
  ReadRows(qs, p, s, scale, qr);
  MakePanels(qr, p, qp);
  ReadRows(ks, p, s, 1.0f, kr);
  ReadRows(vs, p, s, 1.0f, vr);
  float* slice_lse = lses + s * n;
  for (int64_t i = 0; i < p.blocks; ++i) {
    Vec m[kVecs], l[kVecs];
    for (int v = 0; v < kVecs; ++v) m[v] = Splat(kMasked), l[v] = Vec{};
    std::memset(acc, 0, kBlock * d * sizeof(float));
    for (int32_t e = p.row_start[i]; e < p.row_start[i + 1]; ++e) {
      const int64_t j = p.key_block[e];
      const float* mask = p.mask_id[e] < 0 ? nullptr : p.masks + p.mask_id[e] * kPairs;
      Vec top[kVecs], correction[kVecs], sum[kVecs];
      Logits(d, kr + j * kBlock * d, qp + i * d * kBlock, mask, probs, top);
      bool moved = false;
      for (int v = 0; v < kVecs; ++v) {
        const Vec new_m = top[v] > m[v] ? top[v] : m[v];
        correction[v] = Exp(m[v] - new_m);
        for (int lane = 0; lane < kLanes; ++lane) moved |= new_m[lane] != m[v][lane];
        m[v] = new_m;
        sum[v] = Vec{};
      }
      for (int key = 0; key < kBlock; ++key)
        for (int v = 0; v < kVecs; ++v) {
          const int at = key * kBlock + v * kLanes;
          const Vec x = Exp(Load(probs + at) - m[v]);
          Store(probs + at, x);
          sum[v] += x;
        }
      float scale_rows[kBlock];
      for (int v = 0; v < kVecs; ++v) {
        l[v] = l[v] * correction[v] + sum[v];
        Store(scale_rows + v * kLanes, correction[v]);
      }
      if (moved)  // a query's max rose: rescale what it has summed so far
        for (int r = 0; r < kBlock; ++r)
          for (int64_t c = 0; c < d; c += kLanes)
            Store(acc + r * d + c, Load(acc + r * d + c) * scale_rows[r]);
      // acc[query] += sum over keys of P[query, key] · v[key]: probs read transposed.
      Product(kBlock, d, probs, 1, kBlock, vr + j * kBlock * d, d, acc, d, true);
    }
    float m_rows[kBlock], l_rows[kBlock];
    for (int v = 0; v < kVecs; ++v) {
      Store(m_rows + v * kLanes, m[v]);
      Store(l_rows + v * kLanes, l[v]);
    }
    for (int r = 0; r < kBlock; ++r) {
      const float inverse = l_rows[r] > 0.0f ? 1.0f / l_rows[r] : 0.0f;
      for (int64_t c = 0; c < d; c += kLanes)
        Store(qr + (i * kBlock + r) * d + c, Load(acc + r * d + c) * inverse);
      // A query with no allowed key: lse so large that every recomputed probability is 0.
      slice_lse[i * kBlock + r] = l_rows[r] > 0.0f ? m_rows[r] + std::log(l_rows[r])
                                                   : -kMasked;
    }
  }
  WriteRows(qr, p, s, outs);  // the query rows of block i are not read after block i
}

// Backward of slice s: dq, dk, dv from q, k, v, out, lse and d_out; each block's
// probabilities are recomputed from lse (FlashAttention-2).
void BackwardSlice(const Plan& p, int64_t s, float scale, const float* qs, const float* ks,
                   const float* vs, const float* outs, const float* lses, const float* dos,
                   float* dqs, float* dks, float* dvs) {
  const int64_t n = p.length, d = p.dim;
  auto buffer = Scratch(9 * n * d + n + 2 * kPairs + kBlock * d);
  float* qr = buffer.get();       // q · scale, rows
  float* qp = qr + n * d;         // q · scale, panels
  float* kr = qp + n * d;         // key rows
  float* vr = kr + n * d;         // value rows
  float* dor = vr + n * d;        // d_out rows
  float* dop = dor + n * d;       // d_out panels
  float* work = dop + n * d;      // out rows (for delta), then dq rows
  float* dkr = work + n * d;      // dk rows, accumulated
  float* dvr = dkr + n * d;       // dv rows, accumulated
  float* delta = dvr + n * d;     // [n]: rowsum(d_out ⊙ out)
  float* probs = delta + n;       // [32 keys, 32 queries]: logits, then P
  float* dlogits = probs + kPairs;  // [32 keys, 32 queries]: dP, then dS
  float* dq_acc = dlogits + kPairs; // [32 queries, d]
  ReadRows(qs, p, s, scale, qr);
  MakePanels(qr, p, qp);
  ReadRows(ks, p, s, 1.0f, kr);
  ReadRows(vs, p, s, 1.0f, vr);
  ReadRows(dos, p, s, 1.0f, dor);
  MakePanels(dor, p, dop);
  ReadRows(outs, p, s, 1.0f, work);
  for (int64_t t = 0; t < n; ++t) {
    Vec total = Vec{};
    for (int64_t c = 0; c < d; c += kLanes)
      total += Load(dor + t * d + c) * Load(work + t * d + c);
    float sum = 0.0f;
    for (int lane = 0; lane < kLanes; ++lane) sum += total[lane];
    delta[t] = sum;
  }
  std::memset(dkr, 0, 2 * n * d * sizeof(float));  // dk and dv
  const float* slice_lse = lses + s * n;
  for (int64_t i = 0; i < p.blocks; ++i) {
    Vec row_lse[kVecs], row_delta[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      row_lse[v] = Load(slice_lse + i * kBlock + v * kLanes);
      row_delta[v] = Load(delta + i * kBlock + v * kLanes);
    }
    std::memset(dq_acc, 0, kBlock * d * sizeof(float));
    for (int32_t e = p.row_start[i]; e < p.row_start[i + 1]; ++e) {
      const int64_t j = p.key_block[e];
      const float* mask = p.mask_id[e] < 0 ? nullptr : p.masks + p.mask_id[e] * kPairs;
      const float* k_block = kr + j * kBlock * d;
      Logits(d, k_block, qp + i * d * kBlock, mask, probs);
      Product(d, kBlock, vr + j * kBlock * d, d, 1, dop + i * d * kBlock, kBlock, dlogits,
              kBlock, false);
      for (int key = 0; key < kBlock; ++key)
        for (int v = 0; v < kVecs; ++v) {
          const int at = key * kBlock + v * kLanes;
          const Vec pr = Exp(Load(probs + at) - row_lse[v]);  // masked: 0
          Store(probs + at, pr);
          Store(dlogits + at, pr * (Load(dlogits + at) - row_delta[v]));  // dS
        }
      // dq_i += dS · k_j (dS read transposed); dk_j += dS^T · (q_i · scale); dv_j += P^T · d_out_i.
      Product(kBlock, d, dlogits, 1, kBlock, k_block, d, dq_acc, d, true);
      Product(kBlock, d, dlogits, kBlock, 1, qr + i * kBlock * d, d, dkr + j * kBlock * d, d,
              true);
      Product(kBlock, d, probs, kBlock, 1, dor + i * kBlock * d, d, dvr + j * kBlock * d, d,
              true);
    }
    for (int r = 0; r < kBlock; ++r)
      for (int64_t c = 0; c < d; c += kLanes)
        Store(work + (i * kBlock + r) * d + c, Load(dq_acc + r * d + c) * scale);
  }
  WriteRows(work, p, s, dqs);
  WriteRows(dkr, p, s, dks);
  WriteRows(dvr, p, s, dvs);
}

// The handlers: check the call, then run every slice on XLA's intra-op thread pool.
ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> row_start,
                       ffi::Buffer<ffi::S32> key_block, ffi::Buffer<ffi::S32> mask_id,
                       ffi::Buffer<ffi::F32> masks, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> lse, float scale) {
  Plan p;
  if (auto error = Check(q.dimensions(), row_start, key_block, mask_id, masks, &p);
      error.failure()) {
    return error;
  }
  ParallelFor(pool, p.slices, [&](int64_t s) {
    ForwardSlice(p, s, scale, q.typed_data(), k.typed_data(), v.typed_data(),
                 out->typed_data(), lse->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                        ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                        ffi::Buffer<ffi::S32> row_start, ffi::Buffer<ffi::S32> key_block,
                        ffi::Buffer<ffi::S32> mask_id, ffi::Buffer<ffi::F32> masks,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv, float scale) {
  Plan p;
  if (auto error = Check(q.dimensions(), row_start, key_block, mask_id, masks, &p);
      error.failure()) {
    return error;
  }
  ParallelFor(pool, p.slices, [&](int64_t s) {
    BackwardSlice(p, s, scale, q.typed_data(), k.typed_data(), v.typed_data(),
                  out.typed_data(), lse.typed_data(), d_out.typed_data(), dq->typed_data(),
                  dk->typed_data(), dv->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PixelgenBlockAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // key_block
                                  .Arg<ffi::Buffer<ffi::S32>>()  // mask_id
                                  .Arg<ffi::Buffer<ffi::F32>>()  // masks
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PixelgenBlockAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // key_block
                                  .Arg<ffi::Buffer<ffi::S32>>()  // mask_id
                                  .Arg<ffi::Buffer<ffi::F32>>()  // masks
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<float>("scale"));
