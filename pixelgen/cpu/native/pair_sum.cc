// pair_sum: x + (the other party's x), between two XLA:CPU clients of one process.
//
// Each of two one-thread clients (pixelgen.cpu.core_split) holds half of a model's heads and MLP
// units and runs its own decoding loop; after each layer's attention and MLP the two halves
// of the residual update are summed here. The parties meet through memory this library owns:
// each writes its half into its own double buffer, publishes the round, and spins until the
// other has published the same round. XLA's in-process collectives and Python callbacks cost
// tens to hundreds of microseconds a call; this costs about what the slower party is behind.
//
// Both parties add in the same order (party 0's half first), so their sums are bitwise equal
// and the two loops draw the same tokens. Round r uses buffer r % 2: a party writes round
// r + 2's buffer only after seeing the other publish r + 1, which it does after reading r.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void relax() { _mm_pause(); }
#else
static inline void relax() {}
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxElements = 1 << 20;  // floats per party and buffer (4 MiB)
constexpr int64_t kSpinsBeforeYield = 1 << 14;  // about 50-100 microseconds of pause

struct alignas(64) Party {
  std::atomic<int64_t> round{0};
  float buffer[2][kMaxElements];
};

Party parties[2];
std::atomic<int64_t> timeout_ms{60000};

ffi::Error PairSumImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t party) {
  const int64_t n = x.element_count();
  if (party != 0 && party != 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "pair_sum: party must be 0 or 1");
  }
  if (n > kMaxElements) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "pair_sum: more than 2^20 floats per call");
  }
  Party& me = parties[party];
  Party& other = parties[1 - party];
  const int64_t r = me.round.load(std::memory_order_relaxed) + 1;
  std::memcpy(me.buffer[r & 1], x.typed_data(), n * sizeof(float));
  me.round.store(r, std::memory_order_release);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t spins = 0; other.round.load(std::memory_order_acquire) < r; ++spins) {
    // Spin briefly (the other party is usually a few microseconds away), then give the core
    // up on every check: where more threads than cores run, the other party may be waiting
    // for this very core.
    if (spins < kSpinsBeforeYield) relax(); else std::this_thread::yield();
    if ((spins & 0x3FF) == 0x3FF &&
        std::chrono::steady_clock::now() - start >
            std::chrono::milliseconds(timeout_ms.load(std::memory_order_relaxed))) {
      return ffi::Error(ffi::ErrorCode::kDeadlineExceeded,
                        "pair_sum: the other party did not arrive (did its loop fail?)");
    }
  }
  const float* first = party == 0 ? x.typed_data() : other.buffer[r & 1];
  const float* second = party == 0 ? other.buffer[r & 1] : x.typed_data();
  float* out = y->typed_data();
  for (int64_t i = 0; i < n; ++i) out[i] = first[i] + second[i];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PixelgenPairSum, PairSumImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("party"));

// Called (with no loop running) before each pair of loops: both parties start at round 0.
extern "C" void pixelgen_pair_sum_reset(int64_t new_timeout_ms) {
  parties[0].round.store(0);
  parties[1].round.store(0);
  timeout_ms.store(new_timeout_ms);
}
