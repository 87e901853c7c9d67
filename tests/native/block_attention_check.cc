// Runs the slices of the native attention kernel (pixelgen/cpu/native/block_attention.cc) without
// XLA, on random inputs and a few plans, against a float64 dense reference of the forward
// and backward passes. tests/test_native_attention.py builds it with AddressSanitizer and
// UBSan, so a read or write out of bounds fails even where it would not change a result.
// Prints "ok" and exits 0, or names the first mismatch and exits 1.
#include "../../pixelgen/cpu/native/block_attention.cc"

#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

namespace {

using Allowed = std::function<bool(int64_t, int64_t)>;  // (query, key)

// The plan of `allowed` at n (a multiple of 32): every pair with an allowed logit, with its
// own transposed mask (no sharing, unlike the Python plans).
struct OwnedPlan {
  std::vector<int32_t> row_start, key_block, mask_id;
  std::vector<float> masks;
};

OwnedPlan MakePlan(int64_t n, const Allowed& allowed) {
  OwnedPlan plan;
  const int64_t blocks = n / kBlock;
  plan.row_start.push_back(0);
  for (int64_t i = 0; i < blocks; ++i) {
    for (int64_t j = 0; j < blocks; ++j) {
      std::vector<float> mask(kPairs);
      bool any = false;
      for (int key = 0; key < kBlock; ++key)
        for (int query = 0; query < kBlock; ++query) {
          const bool ok = allowed(i * kBlock + query, j * kBlock + key);
          mask[key * kBlock + query] = ok ? 1.0f : 0.0f;
          any |= ok;
        }
      if (!any) continue;
      plan.key_block.push_back(static_cast<int32_t>(j));
      plan.mask_id.push_back(static_cast<int32_t>(plan.masks.size() / kPairs));
      plan.masks.insert(plan.masks.end(), mask.begin(), mask.end());
    }
    plan.row_start.push_back(static_cast<int32_t>(plan.key_block.size()));
  }
  return plan;
}

bool Close(double got, double want, const char* what, int64_t index) {
  if (std::abs(got - want) <= 1e-4 + 1e-4 * std::abs(want)) return true;
  std::printf("%s[%ld]: %.7g, expected %.7g\n", what, static_cast<long>(index), got, want);
  return false;
}

// Forward and backward over every slice of [batch, n, heads, dim] inputs, against float64.
bool Run(int64_t batch, int64_t n, int64_t heads, int64_t dim, const Allowed& allowed) {
  OwnedPlan owned = MakePlan(n, allowed);
  Plan p{owned.row_start.data(), owned.key_block.data(), owned.mask_id.data(),
         owned.masks.data(), batch * heads, n, heads, dim, n / kBlock};
  const int64_t size = batch * n * heads * dim;
  std::mt19937 rng(static_cast<unsigned>(n * 131 + dim));
  std::normal_distribution<float> normal;
  // Exactly sized heap buffers, so the sanitizer sees any access past them.
  std::vector<float> q(size), k(size), v(size), d_out(size);
  for (auto* x : {&q, &k, &v, &d_out})
    for (float& e : *x) e = normal(rng);
  std::vector<float> out(size), lse(batch * heads * n), dq(size), dk(size), dv(size);
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  for (int64_t s = 0; s < p.slices; ++s)
    ForwardSlice(p, s, scale, q.data(), k.data(), v.data(), out.data(), lse.data());
  for (int64_t s = 0; s < p.slices; ++s)
    BackwardSlice(p, s, scale, q.data(), k.data(), v.data(), out.data(), lse.data(),
                  d_out.data(), dq.data(), dk.data(), dv.data());

  bool ok = true;
  for (int64_t b = 0; b < batch && ok; ++b)
    for (int64_t h = 0; h < heads && ok; ++h) {
      auto at = [&](int64_t t, int64_t e) { return ((b * n + t) * heads + h) * dim + e; };
      std::vector<double> prob(n * n, 0.0), ref_out(n * dim, 0.0);
      for (int64_t i = 0; i < n; ++i) {  // softmax over the allowed keys, then p · v
        double top = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          if (!allowed(i, j)) continue;
          double logit = 0.0;
          for (int64_t e = 0; e < dim; ++e) logit += double(q[at(i, e)]) * k[at(j, e)];
          prob[i * n + j] = logit * scale;
          top = std::max(top, prob[i * n + j]);
        }
        double total = 0.0;
        for (int64_t j = 0; j < n; ++j)
          total += allowed(i, j) ? (prob[i * n + j] = std::exp(prob[i * n + j] - top)) : 0.0;
        for (int64_t j = 0; j < n; ++j) {
          prob[i * n + j] = allowed(i, j) ? prob[i * n + j] / total : 0.0;
          for (int64_t e = 0; e < dim; ++e) ref_out[i * dim + e] += prob[i * n + j] * v[at(j, e)];
        }
        for (int64_t e = 0; e < dim && ok; ++e)
          ok = Close(out[at(i, e)], ref_out[i * dim + e], "out", at(i, e));
        ok = ok && Close(lse[(b * heads + h) * n + i], top + std::log(total), "lse", i);
      }
      std::vector<double> ref_dq(n * dim, 0.0), ref_dk(n * dim, 0.0), ref_dv(n * dim, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        double delta = 0.0;  // rowsum(d_out ⊙ out)
        for (int64_t e = 0; e < dim; ++e) delta += double(d_out[at(i, e)]) * ref_out[i * dim + e];
        for (int64_t j = 0; j < n; ++j) {
          const double pr = prob[i * n + j];
          if (pr == 0.0) continue;
          double dp = 0.0;
          for (int64_t e = 0; e < dim; ++e) dp += double(d_out[at(i, e)]) * v[at(j, e)];
          const double ds = pr * (dp - delta) * scale;
          for (int64_t e = 0; e < dim; ++e) {
            ref_dq[i * dim + e] += ds * k[at(j, e)];
            ref_dk[j * dim + e] += ds * q[at(i, e)];
            ref_dv[j * dim + e] += pr * d_out[at(i, e)];
          }
        }
      }
      for (int64_t t = 0; t < n && ok; ++t)
        for (int64_t e = 0; e < dim && ok; ++e)
          ok = Close(dq[at(t, e)], ref_dq[t * dim + e], "dq", at(t, e)) &&
               Close(dk[at(t, e)], ref_dk[t * dim + e], "dk", at(t, e)) &&
               Close(dv[at(t, e)], ref_dv[t * dim + e], "dv", at(t, e));
    }
  if (!ok) std::printf("in batch %ld, length %ld, heads %ld, head_dim %ld\n", (long)batch,
                       (long)n, (long)heads, (long)dim);
  return ok;
}

}  // namespace

int main() {
  const Allowed causal = [](int64_t i, int64_t j) { return j <= i; };
  // A text prefix of 32 seen by all, then a causal window of 40 (DALL·E's shape of mask).
  const Allowed band = [](int64_t i, int64_t j) { return j <= i && (j < 32 || i - j <= 40); };
  const bool ok = Run(2, 96, 3, 32, causal) && Run(1, 128, 2, 64, band) &&
                  Run(2, 64, 1, 96, band);
  std::printf(ok ? "ok\n" : "FAILED\n");
  return ok ? 0 : 1;
}
