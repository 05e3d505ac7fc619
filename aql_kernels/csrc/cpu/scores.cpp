// Fused softmax statistics and the cross-entropy gradient on the CPU (C++17 + OpenMP).
//
// Forward, per row x[0..v) with p = softmax(x):
//   lse = log sum exp x, entropy = -sum p log p, maxprob = max p, margin = p(1st) - p(2nd),
//   argmax (lowest index on ties), and with a target t: loss = lse - x[t],
//   el2n = ||p - onehot(t)||_2.
// The row is walked in chunks of kChunk elements (16 KB of float32, resident in L1). For each chunk
// a first pass finds the chunk maximum (and NaNs), a second pass over the now cache-resident chunk
// accumulates, relative to the running shift k = running max,
//   s = sum e_j, s' = sum_{j != t} e_j, tq = sum (x_j - k) e_j, q' = sum_{j != t} e_j^2,
// with e_j = exp(x_j - k),
// rescaling the running sums when the maximum grows (online softmax, Milakov & Gimelshein 2018,
// "Online normalizer calculation for softmax", arXiv:1805.02867). So every element of the logits is
// read from memory once whatever v is. With AVX-512 a float32 chunk takes one pass instead: the sums
// relative to the running maximum (or, for the row's first finite chunk, the maximum of its first
// 256 logits), kept when the chunk's own maximum is at most 8 above that shift and rescaled to it,
// else redone in the two passes above (fused_chunk). Then
//   lse = k + log s, entropy = log s - tq / s, el2n = sqrt(q' + s'^2) / s.
// The last form is ||p - onehot(t)||^2 = sum_{j != t} p_j^2 + (1 - p_t)^2, a sum of two
// non-negative terms accumulated directly: it avoids the cancellation of sum p^2 - 2 p_t + 1 when
// p_t is near 1 (whose float32 rounding, ~1e-7, becomes ~3e-4 after the square root).
// The top two logits are merged lane by lane and chunk by chunk as a multiset (a tie for the
// maximum gives margin 0).
//
// Special rows: a row containing NaN yields NaN for lse, entropy, maxprob, margin, el2n and loss
// (ignored rows keep loss = el2n = 0), and argmax is the index of its first NaN (what torch.argmax
// returns). A row whose maximum is +inf has lse = +inf and NaN entropy / maxprob / margin / el2n.
// A row of only -inf has lse = -inf and NaN for the probability statistics (as torch.logsumexp and
// softmax give).
//
// The exponential is a Cody-Waite range reduction plus a degree-6 minimax polynomial (the Cephes
// expf coefficients, ~1 ulp on the reduced range; degree 5, <= 1.4 ulp, for the AVX-512 forward
// sums: exp512_sums), scaled by 2^n: AVX-512 intrinsics when the
// compiler targets AVX-512F, otherwise a branch-free scalar version in `omp simd` loops that GCC
// vectorises for whatever -march is in effect. No -ffast-math: inf and NaN are handled explicitly
// above.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../common.h"
#include "kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12 reports its own _mm512_undefined_* placeholders (inside the reduce intrinsics) as
// maybe-uninitialized; the values are never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define AQL_SCORES_AVX512 1
#else
#define AQL_SCORES_AVX512 0
#endif

namespace {

constexpr int64_t kChunk = 4096;
// Chunks shorter than this take the portable (auto-vectorised) path even where AVX-512 is built;
// rows of at most 16 columns take scan_short_row, one masked vector, instead.
constexpr int64_t kSmallChunk = 32;
constexpr int64_t kShortRow = 16;
// Fewer (rows + elements) than this run on the calling thread: opening the OpenMP team costs more
// than the work (see the parallel regions below).
constexpr int64_t kParallelWork = int64_t{1} << 15;
constexpr float kExpLow = -104.0f;  // exp(-104) < 2^-149: below it every result rounds to 0
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f;
constexpr float kP1 = 1.3981999507e-3f;
constexpr float kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f;
constexpr float kP4 = 1.6666665459e-1f;
constexpr float kP5 = 5.0000001201e-1f;

inline float load_element(const void *row, int32_t dtype, int64_t j) {
  switch (dtype) {
    case AQL_DTYPE_BF16:
      return aql::bf16_to_float(static_cast<const uint16_t *>(row)[j]);
    case AQL_DTYPE_F16:
      return aql::f16_to_float(static_cast<const uint16_t *>(row)[j]);
    default:
      return static_cast<const float *>(row)[j];
  }
}

inline void store_element(void *row, int32_t dtype, int64_t j, float value) {
  switch (dtype) {
    case AQL_DTYPE_BF16:
      static_cast<uint16_t *>(row)[j] = aql::float_to_bf16(value);
      break;
    case AQL_DTYPE_F16:
      static_cast<uint16_t *>(row)[j] = aql::float_to_f16(value);
      break;
    default:
      static_cast<float *>(row)[j] = value;
  }
}

// Clamps an exp argument to [kExpLow, 88.7]; NaN becomes kExpLow (callers deal with NaN rows
// separately). Ternaries rather than std::fmin/fmax: they map to (v)maxps/minps, which GCC
// vectorises.
inline float clamp_exp_arg(float x) {
  x = x > kExpLow ? x : kExpLow;
  return x < 88.7f ? x : 88.7f;
}

// Branch-free scalar exp of an argument already in [kExpLow, 88.7]. 2^n is built as two normal
// powers so that subnormal results round correctly.
inline float exp_clamped(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float n = (x * kLog2e + shifter) - shifter;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * (r * r) + r + 1.0f;
  int32_t ni = static_cast<int32_t>(n);
  int32_t half = ni / 2;
  uint32_t bits_a = static_cast<uint32_t>(half + 127) << 23;
  uint32_t bits_b = static_cast<uint32_t>(ni - half + 127) << 23;
  float scale_a, scale_b;
  std::memcpy(&scale_a, &bits_a, sizeof(float));
  std::memcpy(&scale_b, &bits_b, sizeof(float));
  return p * scale_a * scale_b;
}

#if AQL_SCORES_AVX512
// exp(x) on 16 lanes; x <= 0 after the caller's clamp to >= kExpLow; NaN propagates.
inline __m512 exp512(__m512 x) {
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  // 1 + r (1 + r p): two FMAs instead of p r^2 + (r + 1) (a multiply, an add and an FMA); the FMA
  // units are what this loop waits for.
  const __m512 one = _mm512_set1_ps(1.0f);
  p = _mm512_fmadd_ps(r, _mm512_fmadd_ps(r, p, one), one);
  return _mm512_scalef_ps(p, n);  // exact 2^n scaling, subnormal and zero results included
}

// exp for the forward's sums, whose FMA units are the loop's bottleneck: a one-FMA reduction and a
// degree-5 polynomial, 1 + r + r^2 (c0 + c1 r + c2 r^2 + c3 r^3), coefficients fitted for the least
// maximum relative error on [-ln2/2, ln2/2]: at most 1.7e-7 (1.4 ulp; exp512's is 6e-8), three FMAs
// less than exp512 (41 -> 31 ms of the forward at 4096 x 32000 on one core of the 2-core EPYC CI
// machine). The largest errors of the statistics against float64 stay those of float32 summation;
// the gradient keeps exp512.
constexpr float kLn2 = 0.693147182464599609375f;  // ln 2 rounded to float32
constexpr float kQ0 = 0.499992311000824f;
constexpr float kQ1 = 0.16667114198207855f;
constexpr float kQ2 = 0.041890114545822144f;
constexpr float kQ3 = 0.008312524296343327f;

inline __m512 exp512_sums(__m512 x) {
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // One FMA for r = x - n ln2 with ln2 rounded to float32 (off by 1.9e-9): the error n * 1.9e-9 of
  // r is below 2.3e-8 wherever e >= 2^-12, i.e. for every term that moves the sums.
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), x);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kQ3), r, _mm512_set1_ps(kQ2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kQ1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kQ0));
  const __m512 one = _mm512_set1_ps(1.0f);
  p = _mm512_fmadd_ps(r, _mm512_fmadd_ps(r, p, one), one);
  return _mm512_scalef_ps(p, n);
}

inline __m512 load16(const void *row, int32_t dtype, int64_t j) {
  if (dtype == AQL_DTYPE_BF16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(row) + j));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  if (dtype == AQL_DTYPE_F16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(row) + j));
    return _mm512_cvtph_ps(h);
  }
  return _mm512_loadu_ps(static_cast<const float *>(row) + j);
}

// Round-to-nearest-even float32 -> 16-bit (bf16 or f16) for 16 lanes, stored at row[j..j+16).
inline void store16_half(void *row, int32_t dtype, int64_t j, __m512 value) {
  __m256i out;
  if (dtype == AQL_DTYPE_F16) {
    out = _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    __m512i bits = _mm512_castps_si512(value);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000));
    rounded = _mm512_mask_mov_epi32(rounded, nan, quiet);
    out = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i *>(static_cast<uint16_t *>(row) + j), out);
}

// The lanes `valid` of row[j..j+16) as float32, -inf in the others; reads no element outside `valid`
// (masked loads do not fault on the lanes they skip).
inline __m512 load16_masked(const void *row, int32_t dtype, int64_t j, __mmask16 valid) {
  const __m512 minus_inf = _mm512_set1_ps(-kInf);
  if (dtype == AQL_DTYPE_F32) return _mm512_mask_loadu_ps(minus_inf, valid, static_cast<const float *>(row) + j);
  const __m256i h = _mm256_maskz_loadu_epi16(valid, static_cast<const uint16_t *>(row) + j);
  const __m512 x = dtype == AQL_DTYPE_F16 ? _mm512_cvtph_ps(h)
                                          : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_mask_mov_ps(minus_inf, valid, x);
}

// Stores the lanes `valid` of `value` at row[j..j+16) in `dtype` (round to nearest even for 16-bit).
inline void store16_masked(void *row, int32_t dtype, int64_t j, __m512 value, __mmask16 valid) {
  if (dtype == AQL_DTYPE_F32) {
    _mm512_mask_storeu_ps(static_cast<float *>(row) + j, valid, value);
    return;
  }
  alignas(32) uint16_t halves[16];
  store16_half(halves, dtype, 0, value);
  _mm256_mask_storeu_epi16(static_cast<uint16_t *>(row) + j, valid, _mm256_load_si256(reinterpret_cast<const __m256i *>(halves)));
}
#endif

// Running statistics of one row.
struct RowState {
  float shift = 0.0f;       // k: finite, the running maximum when that is finite, else 0
  float sum = 0.0f;         // sum exp(x_j - k)
  float sum_excl = 0.0f;    // sum_{j != t} exp(x_j - k)
  float sum_x_exp = 0.0f;   // sum (x_j - k) exp(x_j - k)
  float sq_excl = 0.0f;     // sum_{j != t} exp(x_j - k)^2
  float first = -kInf;      // largest logit
  float second = -kInf;     // second largest (multiset: equals `first` on a tie)
  int64_t argmax = 0;
  int64_t first_nan = -1;
};

// The sums re-expressed relative to the shift new_shift = shift - delta (delta <= 0): every exp term
// scales by a = exp(delta), the x exp terms also take delta * sum, the squares a^2.
inline void move_shift(RowState &state, float delta, float new_shift) {
  const float a = std::exp(delta);
  state.sum_x_exp = a * (state.sum_x_exp + delta * state.sum);
  state.sum *= a;
  state.sum_excl *= a;
  state.sq_excl *= a * a;
  state.shift = new_shift;
}

// Pass A over a chunk: its maximum, and whether it holds a NaN. Copies a bf16/f16 chunk into
// `converted` as float32 so that pass B reads float32 from L1.
inline float chunk_max_portable(const void *row, int32_t dtype, int64_t c0, int64_t len, float *converted,
                                const float **values, bool *has_nan) {
  const float *x;
  if (dtype == AQL_DTYPE_F32) {
    x = static_cast<const float *>(row) + c0;
  } else {
    for (int64_t j = 0; j < len; ++j) converted[j] = load_element(row, dtype, c0 + j);
    x = converted;
  }
  float m = -kInf;
  int32_t nan_count = 0;
  const int32_t len32 = static_cast<int32_t>(len);
#pragma omp simd reduction(max : m) reduction(+ : nan_count)
  for (int32_t j = 0; j < len32; ++j) {
    const float value = x[j];
    m = m > value ? m : value;
    nan_count += value != value ? 1 : 0;
  }
  const bool any_nan = nan_count != 0;
  *values = x;
  *has_nan = any_nan;
  return m;
}

inline float chunk_max(const void *row, int32_t dtype, int64_t c0, int64_t len, float *converted,
                       const float **values, bool *has_nan) {
#if AQL_SCORES_AVX512
  // Short chunks (small V): the vector set-up and the 32-lane top-2 merge cost more than the data.
  if (len < kSmallChunk) return chunk_max_portable(row, dtype, c0, len, converted, values, has_nan);
  const float *x;
  __m512 vmax0 = _mm512_set1_ps(-kInf), vmax1 = vmax0;
  __mmask16 nan = 0;
  int64_t j = 0;
  if (dtype == AQL_DTYPE_F32) {
    x = static_cast<const float *>(row) + c0;
    for (; j + 32 <= len; j += 32) {
      __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
      vmax0 = _mm512_max_ps(vmax0, a);
      vmax1 = _mm512_max_ps(vmax1, b);
      nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
    }
  } else {
    for (; j + 16 <= len; j += 16) {
      __m512 a = load16(row, dtype, c0 + j);
      _mm512_storeu_ps(converted + j, a);
      vmax0 = _mm512_max_ps(vmax0, a);
      nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    }
    x = converted;
  }
  float m = _mm512_reduce_max_ps(_mm512_max_ps(vmax0, vmax1));
  bool any_nan = nan != 0;
  for (; j < len; ++j) {
    float value = load_element(row, dtype, c0 + j);
    if (dtype != AQL_DTYPE_F32) converted[j] = value;
    any_nan |= value != value;
    m = std::fmax(m, value);
  }
  *values = x;
  *has_nan = any_nan;
  return m;
#else
  return chunk_max_portable(row, dtype, c0, len, converted, values, has_nan);
#endif
}

struct ChunkSums {
  float sum, sum_excl, sum_x_exp, sq_excl;
  float second;  // second largest value of the chunk as a multiset (== its max on a tie)
  float first;   // largest value of the chunk (AVX-512 sums only; not when the chunk holds a NaN)
};

// Pass B over a chunk of float32 values (cache resident): exp sums relative to `shift`, excluding
// the element at `target` (chunk-relative; outside [0, len) excludes nothing) from the sum of
// squares, and the data for the top-2 merge.
#if AQL_SCORES_AVX512
// Multiset top-2 of a lane pair (first >= second) merged with (f, s). Ternaries, not std::fmax: the
// values are never NaN here (a NaN row stops before its sums), and the libm calls that fmax/fmin
// compile to took 8% of the forward at 4096 x 32000 (one core of the 2-core EPYC CI machine).
inline float max_of(float a, float b) { return a > b ? a : b; }
inline float min_of(float a, float b) { return a < b ? a : b; }
inline void merge_top2(float &first, float &second, float f, float s) {
  second = max_of(min_of(first, f), max_of(second, s));
  first = max_of(first, f);
}

// The target column (chunk-relative; outside [0, len) excludes nothing) is kept out of s' and q' by
// a lane mask on their accumulations, all ones except in the one vector that holds it, and its
// exp(x_t - k) is added to s afterwards: s' and q' are sums of positive terms, with no cancellation
// when p_t is near 1. (A separate masked variant for the target's chunk took 10% of the forward.)
//
// `prefetch` (prefetch_bytes long) is the next piece of logits to be read: the next chunk or the
// next row. Pass B reads only L1, so without software prefetch the memory would idle while it
// computes and pass A would then wait for DRAM; prefetching the next chunk here overlaps the two
// (N=4096, V=32000 float32 on the 2-core CI-class Xeon, 2 threads, measured back to back on a
// shared machine: ~150 ms -> ~90 ms).
inline ChunkSums chunk_sums_avx512(const float *x, int64_t len, float shift, int64_t target, const char *prefetch,
                                   int64_t prefetch_bytes) {
  ChunkSums out;
  const __m512 k = _mm512_set1_ps(shift), low = _mm512_set1_ps(kExpLow);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, t0 = s0, t1 = s0, q0 = s0, q1 = s0;
  // per-lane top two (multiset): second = max(second, min(first, v)), first = max(first, v)
  __m512 f0 = _mm512_set1_ps(-kInf), f1 = f0, sec0 = f0, sec1 = f0;
  int64_t j = 0;
  const int64_t iterations = std::max<int64_t>(1, len / 32);
  const int64_t lines_per_iteration = ((prefetch_bytes + 63) / 64 + iterations - 1) / iterations;
  int64_t prefetched = 0;
  // Lanes of the vector at `at` that s' and q' take: all but the target's.
  const auto keep_lanes = [&](int64_t at) -> __mmask16 {
    const uint64_t lane = static_cast<uint64_t>(target - at);
    return lane < 16 ? static_cast<__mmask16>(~(1u << lane)) : static_cast<__mmask16>(0xffff);
  };
  auto step = [&](__m512 v, __mmask16 keep, __m512 &s, __m512 &t, __m512 &q, __m512 &f, __m512 &sec) {
    __m512 d = _mm512_max_ps(low, _mm512_sub_ps(v, k));
    __m512 e = exp512_sums(d);
    s = _mm512_mask_add_ps(s, keep, s, e);
    t = _mm512_fmadd_ps(d, e, t);
    q = _mm512_mask3_fmadd_ps(e, e, q, keep);
    sec = _mm512_max_ps(sec, _mm512_min_ps(f, v));
    f = _mm512_max_ps(f, v);
  };
  for (; j + 32 <= len; j += 32) {
    for (int64_t line = 0; line < lines_per_iteration && prefetched < prefetch_bytes; ++line, prefetched += 64)
      _mm_prefetch(prefetch + prefetched, _MM_HINT_T0);
    step(_mm512_loadu_ps(x + j), keep_lanes(j), s0, t0, q0, f0, sec0);
    step(_mm512_loadu_ps(x + j + 16), keep_lanes(j + 16), s1, t1, q1, f1, sec1);
  }
  for (; j < len; j += 16) {
    // The last lanes: -inf beyond len (no effect on the top two; e = 0 there, and s, q skip them).
    const int64_t rest = std::min<int64_t>(16, len - j);
    const __mmask16 valid = static_cast<__mmask16>((1u << rest) - 1u);
    step(_mm512_mask_loadu_ps(_mm512_set1_ps(-kInf), valid, x + j), keep_lanes(j) & valid, s0, t0, q0, f0, sec0);
  }
  out.sum_excl = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  // e_t enters s after the reduction (scalar exp, the same polynomial).
  out.sum = out.sum_excl + ((target >= 0 && target < len) ? exp_clamped(clamp_exp_arg(x[target] - shift)) : 0.0f);
  out.sum_x_exp = _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
  out.sq_excl = _mm512_reduce_add_ps(_mm512_add_ps(q0, q1));
  alignas(64) float firsts[32], seconds[32];
  _mm512_store_ps(firsts, f0);
  _mm512_store_ps(firsts + 16, f1);
  _mm512_store_ps(seconds, sec0);
  _mm512_store_ps(seconds + 16, sec1);
  float first = -kInf, second = -kInf;
  for (int l = 0; l < 32; ++l) merge_top2(first, second, firsts[l], seconds[l]);
  out.second = second;
  out.first = first;  // may miss values of a lane that held a NaN (max_ps returns its second operand)
  return out;
}
#endif

inline ChunkSums chunk_sums_portable(const float *x, int64_t len, float shift, float chunk_max_value, int64_t target) {
  ChunkSums out;
  // Portable version. `omp simd` licenses the reassociation of these reductions, so GCC vectorises the loop without
  // -ffast-math (the build compiles with OpenMP).
  const int32_t target32 = (target >= 0 && target < len) ? static_cast<int32_t>(target) : -1;
  const int32_t len32 = static_cast<int32_t>(len);
  float s = 0.0f, r = 0.0f, t = 0.0f, q = 0.0f, below = -kInf;
  int32_t count = 0;
#pragma omp simd reduction(+ : s, r, t, q, count) reduction(max : below)
  for (int32_t j = 0; j < len32; ++j) {
    const float v = x[j];
    const float d = clamp_exp_arg(v - shift);
    const float e = exp_clamped(d);
    s += e;
    r += j == target32 ? 0.0f : e;
    t += d * e;
    q += j == target32 ? 0.0f : e * e;
    const float candidate = v < chunk_max_value ? v : -kInf;
    below = below > candidate ? below : candidate;
    count += v == chunk_max_value ? 1 : 0;
  }
  out.sum = s;
  out.sum_excl = r;
  out.sum_x_exp = t;
  out.sq_excl = q;
  out.second = count >= 2 ? chunk_max_value : below;
  return out;
}

inline ChunkSums chunk_sums(const float *x, int64_t len, float shift, float chunk_max_value, int64_t target,
                            const char *prefetch, int64_t prefetch_bytes) {
#if AQL_SCORES_AVX512
  if (len < kSmallChunk) return chunk_sums_portable(x, len, shift, chunk_max_value, target);
  (void)chunk_max_value;
  return chunk_sums_avx512(x, len, shift, target >= 0 && target < len ? target : -1, prefetch, prefetch_bytes);
#else
  (void)prefetch;
  (void)prefetch_bytes;
  return chunk_sums_portable(x, len, shift, chunk_max_value, target);
#endif
}

// The first j with x[j] == value (0 when none). Runs whenever a chunk raises the running maximum
// (about 2.7 of the 8 chunks of a 32000-wide row of random logits, scanning half a chunk each): the
// scalar loop took 21% of the forward at 4096 x 32000 on one core of the 2-core EPYC CI machine.
inline int64_t first_equal(const float *x, int64_t len, float value) {
  int64_t j = 0;
#if AQL_SCORES_AVX512
  const __m512 wanted = _mm512_set1_ps(value);
  for (; j + 16 <= len; j += 16) {
    const __mmask16 equal = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), wanted, _CMP_EQ_OQ);
    if (equal != 0) return j + __builtin_ctz(equal);
  }
#endif
  for (; j < len; ++j)
    if (x[j] == value) return j;
  return 0;
}

inline int64_t first_nan(const float *x, int64_t len) {
  for (int64_t j = 0; j < len; ++j)
    if (x[j] != x[j]) return j;
  return 0;
}

#if AQL_SCORES_AVX512
// How far above the shift a chunk's maximum may lie for its one-pass sums to be kept: e^8 bounds the
// terms, and the rescale that follows (by e^-8 at most) costs at most 8 * 2^-24 of the entropy.
constexpr float kShiftLag = 8.0f;
// Scores read to guess the first shift of a row.
constexpr int64_t kGuessLength = 256;

// One float32 chunk in one pass: the sums relative to a guessed shift (the running maximum, or for
// the row's first finite chunk the maximum of its first kGuessLength scores), kept when the chunk's
// maximum turns out to be at most kShiftLag above it, then rescaled to the new maximum as the two-pass
// path rescales. Saves pass A (17% of the forward at 4096 x 32000, one core of the 2-core EPYC CI
// machine). Returns false, with `state` untouched, when the chunk needs the exact two passes: no
// finite guess, or a maximum too far above it (+inf included). A NaN ends the row (first_nan set).
inline bool fused_chunk(const float *x, int64_t len, int64_t c0, int64_t local_target, const char *prefetch, int64_t prefetch_bytes,
                        RowState &state) {
  float guess = state.shift;
  if (!(state.first > -kInf)) {  // no finite maximum yet: every earlier score is -inf, the sums are 0
    __m512 m = _mm512_set1_ps(-kInf);
    const int64_t head = std::min(len, kGuessLength) & ~int64_t{15};
    for (int64_t j = 0; j < head; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + j));
    guess = _mm512_reduce_max_ps(m);
    if (!std::isfinite(guess)) return false;
  }
  const ChunkSums sums = chunk_sums_avx512(x, len, guess, local_target, prefetch, prefetch_bytes);
  const float cmax = sums.first;
  if (!(cmax <= guess + kShiftLag)) return false;  // +inf, or far above the guess: two passes
  // Every score is now at most kShiftLag above the shift, so each term (x - k) e^(x - k) is finite
  // and sum_x_exp is NaN exactly when a score is NaN (NaN - k, clamped by max_ps, stays NaN): no
  // separate NaN test per vector.
  if (std::isnan(sums.sum_x_exp)) {  // every statistic of the row is NaN: nothing more to read
    state.first_nan = c0 + first_nan(x, len);
    return true;
  }
  state.shift = guess;  // unchanged when the running maximum was finite (shift == first then)
  state.sum += sums.sum;
  state.sum_excl += sums.sum_excl;
  state.sum_x_exp += sums.sum_x_exp;
  state.sq_excl += sums.sq_excl;
  const float new_max = std::fmax(state.first, cmax);  // finite: at least the guess
  if (new_max != state.shift) {
    move_shift(state, state.shift - new_max, new_max);  // delta in [-kShiftLag, 0)
  }
  if (cmax > state.first) state.argmax = c0 + first_equal(x, len, cmax);
  state.second = std::fmax(std::fmin(state.first, cmax), std::fmax(state.second, sums.second));
  state.first = new_max;
  return true;
}
#endif

#if AQL_SCORES_AVX512
// A row of v <= kShortRow columns as one masked vector, with the sums relative to its maximum (0
// when that is not finite), as scan_row's first chunk computes them. The chunked path runs its
// scalar loops here (its vectors need 32 columns): ~120 -> ~15 ns per 10-column row (one core of the
// 2-core EPYC CI machine).
inline RowState scan_short_row(const void *row, int32_t dtype, int64_t v, int64_t target) {
  RowState state;
  const __mmask16 valid = static_cast<__mmask16>((uint32_t{1} << v) - 1u);
  const __m512 x = load16_masked(row, dtype, 0, valid);  // -inf beyond v
  const __mmask16 nan = _mm512_mask_cmp_ps_mask(valid, x, x, _CMP_UNORD_Q);
  if (nan != 0) {  // every statistic of the row is NaN
    state.first_nan = __builtin_ctz(nan);
    return state;
  }
  const float first = _mm512_reduce_max_ps(x);
  const __mmask16 at_max = _mm512_mask_cmp_ps_mask(valid, x, _mm512_set1_ps(first), _CMP_EQ_OQ);
  state.first = first;
  state.argmax = __builtin_ctz(at_max);  // the lowest index of the maximum (0 for a row of -inf)
  // multiset: a tied maximum is also the second largest
  state.second = __builtin_popcount(at_max) >= 2 ? first
                                                 : _mm512_reduce_max_ps(_mm512_mask_mov_ps(x, at_max, _mm512_set1_ps(-kInf)));
  state.shift = std::isfinite(first) ? first : 0.0f;
  const __m512 d = _mm512_max_ps(_mm512_set1_ps(kExpLow), _mm512_sub_ps(x, _mm512_set1_ps(state.shift)));
  const __m512 e = exp512(d);
  const uint64_t target_lane = static_cast<uint64_t>(target);
  const __mmask16 keep = target_lane < static_cast<uint64_t>(v) ? static_cast<__mmask16>(valid & ~(1u << target_lane)) : valid;
  state.sum = _mm512_mask_reduce_add_ps(valid, e);
  state.sum_excl = _mm512_mask_reduce_add_ps(keep, e);
  state.sum_x_exp = _mm512_mask_reduce_add_ps(valid, _mm512_mul_ps(d, e));
  state.sq_excl = _mm512_mask_reduce_add_ps(keep, _mm512_mul_ps(e, e));
  return state;
}
#endif

// One row of the forward. `target` is -1 when the row has no (or an ignored) target; `next_row`
// (or nullptr) is prefetched while the last chunk is summed.
RowState scan_row(const void *row, int32_t dtype, int64_t v, int64_t target, float *converted, const void *next_row) {
  RowState state;
  const int64_t element_size = dtype == AQL_DTYPE_F32 ? 4 : 2;
  for (int64_t c0 = 0; c0 < v; c0 += kChunk) {
    const int64_t len = std::min(kChunk, v - c0);
    const char *prefetch = static_cast<const char *>(row) + (c0 + len) * element_size;
    int64_t prefetch_bytes = std::min(kChunk, v - c0 - len) * element_size;
    if (prefetch_bytes == 0 && next_row != nullptr) {
      prefetch = static_cast<const char *>(next_row);
      prefetch_bytes = std::min(kChunk, v) * element_size;
    }
    const int64_t local_target = (target >= c0 && target < c0 + len) ? target - c0 : -1;
#if AQL_SCORES_AVX512
    if (dtype == AQL_DTYPE_F32 && len >= kSmallChunk && state.first < kInf &&
        fused_chunk(static_cast<const float *>(row) + c0, len, c0, local_target, prefetch, prefetch_bytes, state)) {
      if (state.first_nan >= 0) return state;
      continue;
    }
#endif
    const float *x;
    bool has_nan;
    const float cmax = chunk_max(row, dtype, c0, len, converted, &x, &has_nan);
    if (has_nan) {  // every statistic of the row is NaN: nothing more to read
      state.first_nan = c0 + first_nan(x, len);
      return state;
    }
    const float new_max = std::fmax(state.first, cmax);
    const float new_shift = std::isfinite(new_max) ? new_max : 0.0f;
    if (new_shift != state.shift) {
      // Clamped to [-200, 0]: delta > 0 only when the first finite maximum replaces the initial
      // shift 0 (the sums are still 0 then) or when the maximum becomes +inf (the row is
      // overwritten below); -200 keeps delta * sum finite when the shift jumps across the float
      // range (exp(-200) is already 0 in float32).
      move_shift(state, std::fmin(std::fmax(state.shift - new_shift, -200.0f), 0.0f), new_shift);
    }
    ChunkSums sums = chunk_sums(x, len, state.shift, cmax, local_target, prefetch, prefetch_bytes);
    state.sum += sums.sum;
    state.sum_excl += sums.sum_excl;
    state.sum_x_exp += sums.sum_x_exp;
    state.sq_excl += sums.sq_excl;
    const float chunk_second = sums.second;
    if (cmax > state.first) state.argmax = c0 + first_equal(x, len, cmax);
    state.second = std::fmax(std::fmin(state.first, cmax), std::fmax(state.second, chunk_second));
    state.first = new_max;
  }
  return state;
}

// Rows per grab of the parallel loops: 8, or enough short rows for ~4096 elements.
inline int64_t rows_per_grab(int64_t v) { return std::max<int64_t>(8, 4096 / (v + 32)); }

// AQL_ERR_TARGET_OUT_OF_RANGE for the first target outside [0, v) that is not ignore_index.
aql_status check_targets(const int64_t *targets, int64_t n, int64_t v, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = targets[i];
    if (t != ignore_index && (t < 0 || t >= v))
      return aql::fail(AQL_ERR_TARGET_OUT_OF_RANGE, "target %lld of row %lld is outside [0, %lld) and is not ignore_index=%lld",
                       (long long)t, (long long)i, (long long)v, (long long)ignore_index);
  }
  return AQL_OK;
}

}  // namespace

namespace aql::cpu::AQL_CPU_VARIANT {

aql_status softmax_scores(const void *logits, int32_t dtype, int64_t n, int64_t v, int64_t row_stride,
                          const int64_t *targets, int64_t ignore_index, float *lse, float *entropy, float *maxprob,
                          float *margin, int64_t *argmax, float *loss, float *el2n) {
  if (!aql::valid_dtype(dtype)) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_softmax_scores: unknown dtype code %d", dtype);
  if (n < 0 || v < 1) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_softmax_scores: need n >= 0 and v >= 1, got n=%lld v=%lld", (long long)n, (long long)v);
  if (n > 0 && row_stride < v) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_softmax_scores: row_stride must be >= v=%lld, got %lld", (long long)v, (long long)row_stride);
  if (n > 0 && (logits == nullptr || lse == nullptr || entropy == nullptr || maxprob == nullptr || margin == nullptr || argmax == nullptr))
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_softmax_scores: logits and the five statistics outputs must not be NULL");
  if (targets != nullptr && (loss == nullptr || el2n == nullptr))
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_softmax_scores: loss and el2n must not be NULL when targets are given");
  if (targets != nullptr) {
    const aql_status status = check_targets(targets, n, v, ignore_index);
    if (status != AQL_OK) return status;
  }
  const size_t element_size = dtype == AQL_DTYPE_F32 ? 4 : 2;

  // n (v + 32): a row costs about as much as 32 more columns whatever its length. Threads take
  // rows in grabs of at least ~4096 elements: grabs of 8 short rows made two threads 3x slower than
  // one at 4096 x 10 (the shared counter bounced between the cores).
  const int64_t grab = rows_per_grab(v);
#pragma omp parallel if (n * (v + 32) >= kParallelWork)
  {
    alignas(64) float converted[kChunk];
#pragma omp for schedule(dynamic, grab)
    for (int64_t i = 0; i < n; ++i) {
      const void *row = static_cast<const char *>(logits) + static_cast<size_t>(i) * static_cast<size_t>(row_stride) * element_size;
      const bool has_target = targets != nullptr && targets[i] != ignore_index;
      const int64_t target = has_target ? targets[i] : -1;
      const void *next_row = i + 1 < n ? static_cast<const char *>(row) + static_cast<size_t>(row_stride) * element_size : nullptr;
#if AQL_SCORES_AVX512
      RowState st = v <= kShortRow ? scan_short_row(row, dtype, v, target) : scan_row(row, dtype, v, target, converted, next_row);
#else
      RowState st = scan_row(row, dtype, v, target, converted, next_row);
#endif
      if (st.first_nan >= 0) {
        lse[i] = entropy[i] = maxprob[i] = margin[i] = kNaN;
        argmax[i] = st.first_nan;
        if (targets != nullptr) loss[i] = el2n[i] = has_target ? kNaN : 0.0f;
        continue;
      }
      argmax[i] = st.argmax;
      const float x_target = has_target ? load_element(row, dtype, target) : 0.0f;
      const float sum = st.sum;
      const float sum_excl = st.sum_excl;
      if (st.first == kInf) {
        lse[i] = kInf;
        entropy[i] = maxprob[i] = margin[i] = kNaN;
        if (targets != nullptr) {
          loss[i] = has_target ? kInf - x_target : 0.0f;
          el2n[i] = has_target ? kNaN : 0.0f;
        }
        continue;
      }
      const float log_sum = std::log(sum);
      const float row_lse = st.shift + log_sum;
      lse[i] = row_lse;
      entropy[i] = log_sum - st.sum_x_exp / sum;
      // Relative to the shift (== the maximum when finite) rather than to lse: exact for logits
      // near the float range, where shift + log(sum) rounds to shift.
      const float p1 = std::exp(st.first - st.shift) / sum;
      maxprob[i] = p1;
      margin[i] = p1 - std::exp(st.second - st.shift) / sum;
      if (targets != nullptr) {
        loss[i] = has_target ? (st.shift - x_target) + log_sum : 0.0f;
        el2n[i] = has_target ? std::sqrt(st.sq_excl + sum_excl * sum_excl) / sum : 0.0f;
      }
    }
  }
  return aql::ok();
}

aql_status softmax_scores_backward(const void *logits, int32_t dtype, int64_t n, int64_t v, int64_t row_stride,
                                   const int64_t *targets, int64_t ignore_index, const float *lse,
                                   const float *grad_loss, void *grad_logits, int32_t grad_dtype,
                                   int64_t grad_row_stride) {
  if (!aql::valid_dtype(dtype) || !aql::valid_dtype(grad_dtype))
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_softmax_scores_backward: unknown dtype code %d / %d", dtype, grad_dtype);
  if (n < 0 || v < 1) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_softmax_scores_backward: need n >= 0 and v >= 1, got n=%lld v=%lld", (long long)n, (long long)v);
  if (n > 0 && (row_stride < v || grad_row_stride < v))
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_softmax_scores_backward: row strides must be >= v=%lld, got %lld and %lld",
                     (long long)v, (long long)row_stride, (long long)grad_row_stride);
  if (n > 0 && (logits == nullptr || targets == nullptr || lse == nullptr || grad_loss == nullptr || grad_logits == nullptr))
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_softmax_scores_backward: no pointer may be NULL");
  if (logits == grad_logits && (dtype != grad_dtype || row_stride != grad_row_stride))
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_softmax_scores_backward: in place needs equal dtypes and row strides");
  if (const aql_status status = check_targets(targets, n, v, ignore_index); status != AQL_OK) return status;
  const size_t in_size = dtype == AQL_DTYPE_F32 ? 4 : 2;
  const size_t out_size = grad_dtype == AQL_DTYPE_F32 ? 4 : 2;

  const int64_t grab = rows_per_grab(v);
#pragma omp parallel for schedule(dynamic, grab) if (n * (v + 32) >= kParallelWork)
  for (int64_t i = 0; i < n; ++i) {
    const void *row = static_cast<const char *>(logits) + static_cast<size_t>(i) * static_cast<size_t>(row_stride) * in_size;
    void *out = static_cast<char *>(grad_logits) + static_cast<size_t>(i) * static_cast<size_t>(grad_row_stride) * out_size;
    const int64_t t = targets[i];
    const bool ignored = t == ignore_index;
    // Ignored rows get a zero gradient (also when grad_loss or lse is NaN there).
    const float g = ignored ? 0.0f : grad_loss[i];
    const float row_lse = ignored ? 0.0f : lse[i];
    // Read before the row is written: grad_logits may alias the logits.
    const float x_target = ignored ? 0.0f : load_element(row, dtype, t);
    int64_t j = 0;
#if AQL_SCORES_AVX512
    const __m512 gv = _mm512_set1_ps(g), lv = _mm512_set1_ps(row_lse), low = _mm512_set1_ps(kExpLow);
    for (; j + 16 <= v; j += 16) {
      __m512 x = load16(row, dtype, j);
      __m512 p = exp512(_mm512_max_ps(low, _mm512_sub_ps(x, lv)));
      __m512 grad = ignored ? _mm512_setzero_ps() : _mm512_mul_ps(gv, p);
      if (grad_dtype == AQL_DTYPE_F32)
        _mm512_storeu_ps(static_cast<float *>(out) + j, grad);
      else
        store16_half(out, grad_dtype, j, grad);
    }
    if (j < v) {  // the last v - j < 16 columns as one masked vector
      const __mmask16 rest = static_cast<__mmask16>((uint32_t{1} << (v - j)) - 1u);
      __m512 x = load16_masked(row, dtype, j, rest);
      __m512 p = exp512(_mm512_max_ps(low, _mm512_sub_ps(x, lv)));
      store16_masked(out, grad_dtype, j, ignored ? _mm512_setzero_ps() : _mm512_mul_ps(gv, p), rest);
      j = v;
    }
#endif
    for (; j < v; ++j) {
      const float x = load_element(row, dtype, j);
      const float d = x - row_lse;
      // exp_scalar clamps NaN away; keep NaN rows NaN as the vector path does.
      const float p = d != d ? d : exp_clamped(clamp_exp_arg(d));
      store_element(out, grad_dtype, j, ignored ? 0.0f : g * p);
    }
    if (!ignored) {
      // The one-hot term, written after the row.
      const float d = x_target - row_lse;
      const float p_t = d != d ? d : exp_clamped(clamp_exp_arg(d));
      store_element(out, grad_dtype, t, g * (p_t - 1.0f));
    }
  }
  return aql::ok();
}

}  // namespace aql::cpu::AQL_CPU_VARIANT
