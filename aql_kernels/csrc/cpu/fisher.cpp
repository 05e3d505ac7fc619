// Multi-tensor squared-gradient Fisher EMA on the CPU (C++17 + OpenMP).
//
//   fisher[i] = decay * fisher[i] + (1 - decay) * (scale * grads[i])^2
//
// One pass: each fisher element and each gradient element is read once and each fisher element is
// written once (12 bytes per float32 parameter), against the two passes over the state of
// torch._foreach_mul_ + torch._foreach_addcmul_. The tensors are treated as one concatenated element
// range that is cut into equal contiguous slices, one per thread, so that a list made of one huge
// tensor and many tiny ones keeps every thread equally busy.
#include <algorithm>
#include <cmath>
#include <new>
#include <vector>

#include "../common.h"
#include "kernels.h"

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Below this many elements in total a single thread does the work: waking the OpenMP team costs
// more than it saves.
constexpr int64_t kParallelThreshold = int64_t{1} << 16;
// Thread slices start on multiples of 16 elements (one 64-byte cache line of float32 state), so
// that two threads never write the same line.
constexpr int64_t kSliceAlignment = 16;

struct Coefficients {
  float decay;
  float one_minus_decay;
  float scale;
};

inline float ema(float state, float grad, const Coefficients &c) {
  const float scaled = c.scale * grad;
  return c.decay * state + c.one_minus_decay * (scaled * scaled);
}

void update_f32(float *state, const float *grad, int64_t n, const Coefficients &c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) state[i] = ema(state[i], grad[i], c);
}

void update_bf16(float *state, const uint16_t *grad, int64_t n, const Coefficients &c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) state[i] = ema(state[i], aql::bf16_to_float(grad[i]), c);
}

void update_f16(float *state, const uint16_t *grad, int64_t n, const Coefficients &c) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  // The portable converter branches on subnormals and does not vectorise; F16C converts 8 at a
  // time, exactly (half -> float is exact).
  const __m256 decay = _mm256_set1_ps(c.decay);
  const __m256 one_minus_decay = _mm256_set1_ps(c.one_minus_decay);
  const __m256 scale = _mm256_set1_ps(c.scale);
  for (; i + 8 <= n; i += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i *>(grad + i));
    const __m256 scaled = _mm256_mul_ps(scale, _mm256_cvtph_ps(half));
    const __m256 old_state = _mm256_loadu_ps(state + i);
    const __m256 fresh = _mm256_add_ps(_mm256_mul_ps(decay, old_state),
                                       _mm256_mul_ps(one_minus_decay, _mm256_mul_ps(scaled, scaled)));
    _mm256_storeu_ps(state + i, fresh);
  }
#endif
  for (; i < n; ++i) state[i] = ema(state[i], aql::f16_to_float(grad[i]), c);
}

// Elements [begin, end) of one tensor.
void update(float *state, const void *grad, int32_t dtype, int64_t begin, int64_t end, const Coefficients &c) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  switch (dtype) {
    case AQL_DTYPE_F32:
      update_f32(state + begin, static_cast<const float *>(grad) + begin, n, c);
      break;
    case AQL_DTYPE_BF16:
      update_bf16(state + begin, static_cast<const uint16_t *>(grad) + begin, n, c);
      break;
    default:
      update_f16(state + begin, static_cast<const uint16_t *>(grad) + begin, n, c);
      break;
  }
}

struct Entry {
  float *state;
  const void *grad;
  int32_t dtype;
  int64_t numel;
};

// Updates the slice [begin, end) of the concatenated range; `starts[k]` is the first element of
// entries[k] in that range.
void update_slice(const std::vector<Entry> &entries, const std::vector<int64_t> &starts, int64_t begin, int64_t end,
                  const Coefficients &c) {
  if (begin >= end) return;
  // The entry holding `begin`: the last k with starts[k] <= begin.
  size_t k = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
  for (; k < entries.size() && starts[k] < end; ++k) {
    const int64_t local_begin = std::max<int64_t>(begin - starts[k], 0);
    const int64_t local_end = std::min<int64_t>(end - starts[k], entries[k].numel);
    update(entries[k].state, entries[k].grad, entries[k].dtype, local_begin, local_end, c);
  }
}

}  // namespace

namespace aql::cpu::AQL_CPU_VARIANT {

aql_status fisher_ema(int64_t count, float *const *fisher, const void *const *grads, const int32_t *grad_dtypes,
                      const int64_t *numels, double decay, double scale) {
  if (count < 0) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_fisher_ema: count must be >= 0, got %lld", (long long)count);
  if (count == 0) return aql::ok();
  if (fisher == nullptr || grads == nullptr || grad_dtypes == nullptr || numels == nullptr) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_fisher_ema: fisher, grads, grad_dtypes and numels must not be NULL");
  }
  if (!(decay >= 0.0 && decay < 1.0)) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_fisher_ema: decay must be in [0, 1), got %g", decay);
  }
  if (!std::isfinite(static_cast<float>(scale))) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_fisher_ema: scale must be finite in float32, got %g", scale);
  }
  std::vector<Entry> entries;
  std::vector<int64_t> starts;
  try {
    entries.reserve(static_cast<size_t>(count));
    starts.reserve(static_cast<size_t>(count));
  } catch (const std::bad_alloc &) {
    return aql::fail(AQL_ERR_OUT_OF_MEMORY, "aql_fisher_ema: out of host memory for a list of %lld tensors", (long long)count);
  }
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (grads[i] == nullptr) continue;  // a None gradient leaves its state unchanged
    if (numels[i] < 0) {
      return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_fisher_ema: numels[%lld] must be >= 0, got %lld", (long long)i,
                       (long long)numels[i]);
    }
    if (numels[i] == 0) continue;
    if (fisher[i] == nullptr) {
      return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_fisher_ema: fisher[%lld] is NULL but grads[%lld] is not", (long long)i,
                       (long long)i);
    }
    if (!aql::valid_dtype(grad_dtypes[i])) {
      return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_fisher_ema: grad_dtypes[%lld] must be 0 (f32), 1 (bf16) or 2 (f16), got %d",
                       (long long)i, (int)grad_dtypes[i]);
    }
    entries.push_back(Entry{fisher[i], grads[i], grad_dtypes[i], numels[i]});
    starts.push_back(total);
    total += numels[i];
  }
  if (entries.empty()) return aql::ok();
  // 1 - decay in double, then rounded: exact to float32 precision even for decay close to 1.
  const Coefficients c{static_cast<float>(decay), static_cast<float>(1.0 - decay), static_cast<float>(scale)};

#ifdef _OPENMP
#pragma omp parallel if (total >= kParallelThreshold)
  {
    const int64_t threads = omp_get_num_threads();
    const int64_t thread = omp_get_thread_num();
    auto boundary = [&](int64_t t) -> int64_t {
      if (t >= threads) return total;
      const int64_t raw = static_cast<int64_t>((static_cast<__int128>(total) * t) / threads);
      return raw - raw % kSliceAlignment;
    };
    update_slice(entries, starts, boundary(thread), boundary(thread + 1), c);
  }
#else
  update_slice(entries, starts, 0, total, c);
#endif
  return aql::ok();
}

}  // namespace aql::cpu::AQL_CPU_VARIANT
