// What the CPU and CUDA selectors must agree on: the digit schedule, the order-preserving key (and its
// inverse), and the
// sample that guesses the top digits of the k-th largest key. One definition, so the two cannot drift
// apart (tests/kernels/test_select.py builds its adversarial "sample decoys" from the same sample).
#ifndef AQL_SELECT_COMMON_H
#define AQL_SELECT_COMMON_H

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define AQL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AQL_HOST_DEVICE inline
#endif

namespace aql::select {

// Digit schedule of the keys: 12 bits over all scores, then 10 + 10 over the candidates only. The
// first digit is as wide as one GPU block's shared-memory histogram comfortably allows (16 KiB of
// uint32 counters): the wider it is, the fewer candidates survive it.
constexpr int kFirstBits = 12;
constexpr int kRefineBits = 10;

// The sample: scores floor(j n / s) for j < s = min(n, kSample).
constexpr int64_t kSample = int64_t{1} << 16;
// Half-width of the guessed rank range, in standard deviations of a sample rank.
constexpr double kSampleSigmas = 6.0;

// Order-preserving key: larger float -> larger key; NaN -> 0 (below -inf, whose key is 0x007fffff);
// -0.0 and +0.0 -> 0x80000000. Branch-free masks: the form with ?: compiled to branches on the CPU and
// took 22 ms per 10^7 keys against 5 ms for this one (gcc -O3 -march=native, 2-core Xeon CI-class CPU).
AQL_HOST_DEVICE uint32_t float_key(float value) {
#ifdef __CUDA_ARCH__
  const uint32_t bits = __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
#endif
  const uint32_t magnitude = bits & 0x7fffffffu;
  const uint32_t canonical = bits & (0u - static_cast<uint32_t>(magnitude != 0u));  // -0.0 -> +0.0
  const uint32_t key = canonical ^ (static_cast<uint32_t>(static_cast<int32_t>(canonical) >> 31) | 0x80000000u);
  return key & (0u - static_cast<uint32_t>(magnitude <= 0x7f800000u));  // NaN -> 0
}

// Inverse of float_key on its image: key 0 becomes the canonical quiet NaN, both zeros come back as
// +0.0. What topk_threshold returns for the k-th largest key.
AQL_HOST_DEVICE float key_to_float(uint32_t key) {
  uint32_t bits;
  if (key == 0u) {
    bits = 0x7fc00000u;
  } else if (key & 0x80000000u) {
    bits = key ^ 0x80000000u;
  } else {
    bits = ~key;
  }
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

// The sample ranks (descending, 1-based) whose top digits bound the candidate range: k s / n -+
// kSampleSigmas standard deviations of a sample rank (sqrt(s p (1 - p)), p = k / n), plus 2 for the
// rounding of the evenly spaced positions. A rank below 1 leaves the range open at the top, one above
// s at the bottom. When the sample is every score the k-th largest's own digit is exact. A miss (the
// k-th largest outside the range) costs one more pass: the exact histogram, then the mask again.
inline void sample_ranks(int64_t n, int64_t k, int64_t samples, int64_t *rank_high, int64_t *rank_low) {
  if (samples == n) {
    *rank_high = *rank_low = k;
    return;
  }
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const double center = p * static_cast<double>(samples);
  const double margin = kSampleSigmas * std::sqrt(static_cast<double>(samples) * p * (1.0 - p)) + 2.0;
  const double high = std::floor(center - margin), low = std::ceil(center + margin);
  *rank_high = high < 1.0 ? 0 : static_cast<int64_t>(high);
  *rank_low = low > static_cast<double>(samples) ? samples + 1 : static_cast<int64_t>(low);
}

// Bit width of the largest index n - 1 (at least 1).
inline int index_bits(int64_t n) {
  int bits = 1;
  while (bits < 63 && (static_cast<uint64_t>(n - 1) >> bits) != 0) ++bits;
  return bits;
}

}  // namespace aql::select

#endif  // AQL_SELECT_COMMON_H
