// Exact top-k selection on the CPU: the twin of csrc/cuda/select.cu, phase for phase (but 5) and with the
// same digit schedule (a sampled key range of 12-bit digits or 22-bit prefixes, then 12 + 10 + 10 key
// bits over the candidates less what the range fixes, then 10-bit index digits), so that the
// algorithm of the GPU kernels is what the CPU tests exercise.
//
// Order: scores become order-preserving uint32 keys (NaN -> 0, below -inf; -0.0 -> the key of +0.0).
// The selected set is the first k of a stable descending sort, i.e. the k largest of the composite
// (key, -index). Radix select on that composite, most significant digit first (the radix select of
// Alabi et al., "Fast k-selection algorithms for GPUs", ACM JEA 2012; the sampled first digit follows
// SampleSelect, Ribizel and Anzt, "Parallel selection on GPUs", 2020; the index tie-break is ours):
//   1. the top 12 bits of 65536 evenly spaced scores: the digits of the sample ranks around k s / n
//      (see sample_ranks); when they span at most 4 digits, the 22-bit prefixes of the samples
//      in those digits: the key range [low, high] (whole 12-bit digits, or 22-bit prefixes);
//   2. one pass that writes the mask (key > provisional, the top of the digit or prefix that holds
//      the sample's own estimate of the k-th largest, in [low, high]), compacts the keys and indices
//      of the scores in [low, high] (the candidates) and counts the scores above high; the k-th
//      largest is a candidate exactly when above < k <= above + candidates;
//   3. only after a miss: the exact histogram of the top 12 bits, its bucket, and pass 2 again with
//      that single digit;
//   4. digit passes over the candidates only (12 + 10 + 10 bits, less what the range fixes
//      already): the exact k-th key T and the number t of elements equal to T that the first k take;
//   5. when t is less than the number of T-equal elements, the t-th T-equal candidate in index
//      order (the cutoff): the candidates are stored in index order, one scan finds it (the GPU
//      kernels run digit passes over the indices instead);
//   6. the candidates whose mask byte from pass 2 is not (key > T, or key == T and index <= cutoff)
//      get that value (those between the estimate and T: ~10% of them for uniform scores);
//   7. indices, when asked for: per-chunk count of the mask, exclusive scan, ascending write.
// Up to kSmallScores (32768) scores none of this runs: one thread nth_elements the composite
// (key, -index) keys (select_small), whose fixed cost is far below the phases' (~20 us) at the sizes of a
// candidate batch or a small data set.
// Reads of the scores: 1 (mask + compaction; 3 after a miss), plus one write of the mask; candidate
// passes touch 12 bytes per candidate (about 2% of the scores for uniform [0, 1) scores at k = 0.2 n,
// fewer for spread-out ones; all of them when all are equal). Under AVX-512 the mask pass compares a
// two-instruction signed "order" of the float bits with bounds derived from [low, high] (order_lower,
// order_upper) instead of computing every key.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
// gcc 12 reports its own intrinsics' placeholder operands as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

#include "../common.h"
#include "../select_common.h"
#include "kernels.h"

namespace {

using aql::select::float_key;
using aql::select::key_to_float;
using aql::select::kFirstBits;
using aql::select::kRefineBits;
using aql::select::kSample;
using aql::select::sample_ranks;

constexpr int kBuckets = 1 << kFirstBits;
// Below these sizes one thread does the work. Each parallel region ends in a join, and on a shared
// 2-core machine the second thread is often descheduled for a time slice: with the candidate passes
// parallel too (three more joins) 10^7 uniform scores took 49-52 ms instead of 27-29 ms on the
// 2-core Xeon CI-class CPU while other jobs ran.
constexpr int64_t kParallelScores = int64_t{1} << 20;
constexpr int64_t kParallelCandidates = int64_t{1} << 22;
constexpr int kChunksPerThread = 8;
// Slots after each chunk's candidates that mask_and_compact may overwrite (one vector's worth).
constexpr int64_t kCompactSlack = 16;

// The candidate arrays of one calling thread, kept from call to call: new pages cost a page fault and
// a zero fill each, ~0.5 ms per call for the 190k candidates of 10^7 uniform scores. Only the pages
// that candidates reach are ever resident; after a call that reached more than kKeepCandidates of
// them the arrays are released, so a kept buffer holds at most ~kKeepCandidates * 12 bytes.
constexpr int64_t kKeepCandidates = int64_t{1} << 21;

struct CandidateScratch {
  std::unique_ptr<uint32_t[]> keys;   // not std::vector: no zero fill of pages no candidate reaches
  std::unique_ptr<int64_t[]> indices;
  size_t capacity = 0;

  void release_if_large(int64_t used) {
    if (used > kKeepCandidates) {
      keys.reset();
      indices.reset();
      capacity = 0;
    }
  }
};

CandidateScratch &candidate_scratch(size_t capacity) {
  thread_local CandidateScratch scratch;
  if (scratch.capacity < capacity) {
    scratch.keys.reset();  // the old arrays go before the new ones are mapped
    scratch.indices.reset();
    scratch.capacity = 0;
    scratch.keys.reset(new uint32_t[capacity]);
    scratch.indices.reset(new int64_t[capacity]);
    scratch.capacity = capacity;
  }
  return scratch;
}

struct Pick {
  uint32_t digit;          // the bucket that holds the wanted element
  uint64_t remaining;      // its rank inside that bucket (1-based)
  uint64_t bucket_count;   // elements in that bucket
};

// The bucket holding the `remaining`-th element, counting from the top bucket (descending) or from
// bucket 0 (ascending). 1 <= remaining <= sum(hist) by construction.
Pick pick_bucket(const uint64_t *hist, int buckets, uint64_t remaining, bool descending) {
  uint64_t before = 0;
  for (int step = 0; step < buckets; ++step) {
    const int digit = descending ? buckets - 1 - step : step;
    if (before + hist[digit] >= remaining) {
      return Pick{static_cast<uint32_t>(digit), remaining - before, hist[digit]};
    }
    before += hist[digit];
  }
  // Unreachable when the histogram counts at least `remaining` elements.
  const int digit = descending ? 0 : buckets - 1;
  return Pick{static_cast<uint32_t>(digit), remaining - (before - hist[digit]), hist[digit]};
}

int thread_count(int64_t work, int64_t threshold) {
#ifdef _OPENMP
  return work < threshold ? 1 : omp_get_max_threads();
#else
  (void)work;
  (void)threshold;
  return 1;
#endif
}

inline int64_t chunk_begin(int64_t n, int part, int parts) {
  return static_cast<int64_t>((static_cast<unsigned __int128>(n) * part) / parts);
}

// Keys are computed a block at a time into a small buffer (that loop vectorises), then counted:
// 8.4 ms instead of 20.8 ms for 10^7 uniform scores on one core of the 2-core Xeon CI-class CPU.
constexpr int kBlock = 256;

// Histogram of the top kFirstBits of the keys of scores[begin, end).
void histogram_top_digit(const float *scores, int64_t begin, int64_t end, uint64_t *out) {
  std::vector<uint32_t> counts(kBuckets, 0u);
  std::fill(out, out + kBuckets, 0u);
  uint32_t digits[kBlock];
  int64_t i = begin;
  while (i < end) {
    // uint32 counters: flush at least every 2^31 elements.
    const int64_t stop = std::min(end, i + (int64_t{1} << 31));
    for (; i < stop; i += kBlock) {
      const int len = static_cast<int>(std::min<int64_t>(kBlock, stop - i));
      for (int j = 0; j < len; ++j) digits[j] = float_key(scores[i + j]) >> (32 - kFirstBits);
      for (int j = 0; j < len; ++j) ++counts[digits[j]];
    }
    for (int d = 0; d < kBuckets; ++d) {
      out[d] += counts[d];
      counts[d] = 0u;
    }
  }
}

// The signed "order" of a score's bits: b ^ 0x7fffffff for negative floats, b for positive ones. It
// is monotone in the float order, equal to key ^ 0x80000000 (as int32) on every non-NaN score but
// -0.0, which gets -1 (just below +0.0 at 0: nothing lies between them), and it puts NaN outside
// [order(-inf), order(+inf)]. Two vector operations instead of the eight of float_key; the bounds
// below absorb the two exceptions.
constexpr int32_t kOrderNegInf = static_cast<int32_t>(0x807fffffu);  // order of -inf
constexpr int32_t kOrderPosInf = 0x7f800000;                          // order of +inf

// The largest order of a non-NaN score whose key is <= high (kOrderNegInf - 1 when only NaN's is).
inline int32_t order_upper(uint32_t high) {
  if (high >= 0xff800000u) return kOrderPosInf;
  if (high >= 0x007fffffu) {
    // Keys in [0x007fffff, 0x7ffffffe] are negative floats, [0x80000000, 0xff800000] positive ones
    // and +-0.0; 0x7fffffff is no score's key, its nearest one below is 0x7ffffffe.
    const uint32_t key = high == 0x7fffffffu ? 0x7ffffffeu : high;
    return static_cast<int32_t>(key ^ 0x80000000u);
  }
  return kOrderNegInf - 1;
}

// The smallest order of a non-NaN score whose key is >= low (kOrderPosInf + 1 when none is).
inline int32_t order_lower(uint32_t low) {
  if (low <= 0x007fffffu) return kOrderNegInf;
  if (low == 0x7fffffffu || low == 0x80000000u) return -1;  // both zeros
  if (low <= 0xff800000u) return static_cast<int32_t>(low ^ 0x80000000u);
  return kOrderPosInf + 1;
}

// The mask (key > provisional) and the keys and indices of the scores whose key is in [low, high]
// (the candidates), for scores[begin, end), candidates written from `out` on; returns where they end
// and adds the number of scores with key > high to *above_high. low <= provisional <= high: the
// mask bytes of candidates are provisional (phase 6 corrects those on the wrong side of the exact
// threshold), all others final. Writes up to kCompactSlack slots past the returned end.
#if defined(__AVX512F__)
inline __m512i float_keys512(__m512i bits) {  // float_key on 16 lanes
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  const __m512i canonical = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(magnitude, magnitude), bits);
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(canonical, 31), _mm512_set1_epi32(static_cast<int>(0x80000000u)));
  return _mm512_maskz_mov_epi32(_mm512_cmple_epu32_mask(magnitude, _mm512_set1_epi32(0x7f800000)), _mm512_xor_si512(canonical, flip));
}

// AVX-512, per block of kCompactBlock scores: signed compares of the order (mask: order > the
// provisional bound and not NaN; candidate: lower <= order <= upper, or NaN when low == 0,
// kNaNCandidates), the mask as bytes, and the candidates' block offsets compressed into a register
// and stored whole (the memory form of vpcompress is microcoded on AMD Zen 4: 14.3 ms of 19 ms for
// 10^7 uniform scores, one core of the 2-core EPYC CI machine; a branch on "any candidate"
// mispredicts). Then the block's candidates become keys (gathered from the block, still in L1) and
// indices, and those above the provisional key are counted (they are in the mask count but not
// above high). Compressing the offsets only, not the scores too: 2.6 -> 2.2 ms on that core.
constexpr int kCompactBlock = 2048;

template <bool kNaNCandidates>
int64_t mask_and_compact_avx512(const float *scores, int64_t begin, int64_t end, uint32_t low, uint32_t high, uint32_t provisional,
                                uint8_t *selected, uint32_t *keys_out, int64_t *indices_out, int64_t out, int64_t *above_high) {
  const __m512i lower = _mm512_set1_epi32(order_lower(low)), upper = _mm512_set1_epi32(order_upper(high));
  const __m512i mask_bound = _mm512_set1_epi32(order_upper(provisional));
  const __m512i positive_infinity = _mm512_set1_epi32(kOrderPosInf), negative_infinity = _mm512_set1_epi32(kOrderNegInf);
  const __m512i magnitude_bits = _mm512_set1_epi32(0x7fffffff);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sixteen = _mm512_set1_epi32(16), provisional_key = _mm512_set1_epi32(static_cast<int>(provisional));
  const __m128i ones = _mm_set1_epi8(1);
  alignas(64) uint32_t offsets[kCompactBlock + kCompactSlack];
  int64_t masked = 0, candidates_masked = 0;
  while (begin + 16 <= end) {
    const int64_t block_end = begin + std::min<int64_t>(kCompactBlock, (end - begin) & ~int64_t{15});
    int count = 0;
    __m512i offset = lanes;
    for (int64_t i = begin; i < block_end; i += 16) {
      const __m512i bits = _mm512_loadu_si512(scores + i);
      // order = bits ^ ((bits >> 31) & 0x7fffffff): ternary-logic immediate 0x78 is a ^ (b & c).
      const __m512i order = _mm512_ternarylogic_epi32(bits, _mm512_srai_epi32(bits, 31), magnitude_bits, 0x78);
      const __mmask16 below_nan = _mm512_cmple_epi32_mask(order, positive_infinity);
      const __mmask16 above = _mm512_mask_cmpgt_epi32_mask(below_nan, order, mask_bound);
      masked += __builtin_popcount(above);
      if (selected != nullptr) _mm_storeu_si128(reinterpret_cast<__m128i *>(selected + i), _mm_maskz_mov_epi8(above, ones));
      __mmask16 candidate = _mm512_mask_cmple_epi32_mask(_mm512_cmpge_epi32_mask(order, lower), order, upper);
      if constexpr (kNaNCandidates) {
        candidate |= static_cast<__mmask16>(~_mm512_mask_cmpge_epi32_mask(below_nan, order, negative_infinity));
      }
      _mm512_storeu_si512(offsets + count, _mm512_maskz_compress_epi32(candidate, offset));
      offset = _mm512_add_epi32(offset, sixteen);
      count += __builtin_popcount(candidate);
    }
    // Offsets -> keys and indices, 16 candidates at a time (about 2% of the scores for uniform
    // scores at k = 0.2 n).
    const __m512i block_begin = _mm512_set1_epi64(begin);
    for (int j = 0; j < count; j += 16) {
      const __mmask16 lanes_in = count - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (count - j)) - 1u);
      const __m512i offset16 = _mm512_load_si512(offsets + j);
      const __m512i key = float_keys512(_mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes_in, offset16, scores + begin, 4));
      _mm512_mask_storeu_epi32(keys_out + out + j, lanes_in, key);
      candidates_masked += __builtin_popcount(_mm512_mask_cmpgt_epu32_mask(lanes_in, key, provisional_key));
      _mm512_mask_storeu_epi64(indices_out + out + j, static_cast<__mmask8>(lanes_in),
                               _mm512_add_epi64(block_begin, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(offset16))));
      _mm512_mask_storeu_epi64(indices_out + out + j + 8, static_cast<__mmask8>(lanes_in >> 8),
                               _mm512_add_epi64(block_begin, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(offset16, 1))));
    }
    out += count;
    begin = block_end;
  }
  *above_high += masked - candidates_masked;
  return out;
}
#endif

int64_t mask_and_compact(const float *scores, int64_t begin, int64_t end, uint32_t low, uint32_t high, uint32_t provisional,
                         uint8_t *selected, uint32_t *keys_out, int64_t *indices_out, int64_t out, int64_t *above_high) {
#if defined(__AVX512F__)
  out = low == 0 ? mask_and_compact_avx512<true>(scores, begin, end, low, high, provisional, selected, keys_out, indices_out, out, above_high)
                 : mask_and_compact_avx512<false>(scores, begin, end, low, high, provisional, selected, keys_out, indices_out, out, above_high);
  begin += (end - begin) & ~int64_t{15};
#endif
  // The scalar form (and the last n % 16 scores under AVX-512). Per block, one vectorised loop
  // computes the keys, the mask bytes and a 0/1 "is a candidate" byte per score; the candidates are
  // then picked eight flag bytes at a time with ctz, so the scalar work follows the number of
  // candidates, not of the scores. The mask goes through a local buffer: stores through a uint8_t
  // pointer may alias anything and kept the loop scalar.
  int64_t above_total = 0;
  uint32_t keys[kBlock];
  uint8_t above[kBlock];
  uint8_t is_candidate[kBlock + 8];
  for (int64_t i = begin; i < end; i += kBlock) {
    const int len = static_cast<int>(std::min<int64_t>(kBlock, end - i));
    uint32_t any = 0, above_block = 0;
    for (int j = 0; j < len; ++j) {
      const uint32_t key = float_key(scores[i + j]);
      const uint32_t in_range = key - low <= high - low;  // low <= key <= high
      keys[j] = key;
      above[j] = key > provisional;
      above_block += key > high;
      is_candidate[j] = static_cast<uint8_t>(in_range);
      any |= in_range;
    }
    above_total += above_block;
    if (selected != nullptr) std::memcpy(selected + i, above, static_cast<size_t>(len));
    if (any == 0) continue;
    for (int j = len; j < ((len + 7) & ~7); ++j) is_candidate[j] = 0;
    for (int j = 0; j < len; j += 8) {
      uint64_t word;
      std::memcpy(&word, is_candidate + j, sizeof(word));
      while (word != 0) {
        const int at = j + (__builtin_ctzll(word) >> 3);
        keys_out[out] = keys[at];
        indices_out[out] = i + at;
        ++out;
        word &= word - 1;
      }
    }
  }
  *above_high += above_total;
  return out;
}

// One refinement pass over the candidates: histogram of `digit_of` over the positions i in the
// ranges [begins[r], ends[r]) that are `accept`ed; with several threads, ranges are handed out
// dynamically (as the chunks of the scores) into per-range histograms merged into `hist`.
template <class Accept, class DigitOf>
void histogram_ranges(const int64_t *begins, const int64_t *ends, int ranges, int64_t total, int buckets, Accept accept,
                      DigitOf digit_of, uint64_t *hist) {
  const int threads = thread_count(total, kParallelCandidates);
  const int parts = threads == 1 ? 1 : ranges;
  std::vector<uint64_t> partial(static_cast<size_t>(parts) * buckets, 0u);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int r = 0; r < ranges; ++r) {
    uint64_t *mine = partial.data() + static_cast<size_t>(parts == 1 ? 0 : r) * buckets;
    for (int64_t i = begins[r]; i < ends[r]; ++i) {
      if (accept(i)) ++mine[digit_of(i)];
    }
  }
  std::fill(hist, hist + buckets, 0u);
  for (int r = 0; r < parts; ++r) {
    for (int d = 0; d < buckets; ++d) hist[d] += partial[static_cast<size_t>(r) * buckets + d];
  }
}

// The same over positions [0, count), cut into chunks.
template <class Accept, class DigitOf>
void histogram_candidates(int64_t count, int buckets, Accept accept, DigitOf digit_of, uint64_t *hist) {
  const int threads = thread_count(count, kParallelCandidates);
  const int chunks = threads == 1 ? 1 : threads * (buckets <= kBuckets ? kChunksPerThread : 1);
  std::vector<int64_t> begins(static_cast<size_t>(chunks)), ends(static_cast<size_t>(chunks));
  for (int c = 0; c < chunks; ++c) {
    begins[c] = chunk_begin(count, c, chunks);
    ends[c] = chunk_begin(count, c + 1, chunks);
  }
  histogram_ranges(begins.data(), ends.data(), chunks, count, buckets, accept, digit_of, hist);
}

// One thread's key digit pass over the candidates: the histogram of the `bits`-bit digit at `shift`
// of the keys whose top `used` (>= 1) bits are `prefix`. After the first refinement only a few
// hundred of the ~190k candidates of 10^7 uniform scores match: under AVX-512 16 keys are compared
// at once and only the matches are counted (0.2 ms -> 0.03 ms for that pass on one core of the
// 2-core EPYC CI machine).
void key_digit_histogram(const uint32_t *keys, const int64_t *begins, const int64_t *ends, int ranges, int used, uint32_t prefix,
                         int shift, int bits, uint64_t *hist) {
  const int buckets = 1 << bits;
  const uint32_t digit_mask = static_cast<uint32_t>(buckets) - 1u;
  std::fill(hist, hist + buckets, 0u);
  for (int r = 0; r < ranges; ++r) {
    int64_t i = begins[r];
#if defined(__AVX512F__)
    const __m512i wanted = _mm512_set1_epi32(static_cast<int>(prefix));
    const __m128i prefix_shift = _mm_cvtsi32_si128(32 - used);
    for (; i + 16 <= ends[r]; i += 16) {
      __mmask16 match = _mm512_cmpeq_epi32_mask(_mm512_srl_epi32(_mm512_loadu_si512(keys + i), prefix_shift), wanted);
      while (match != 0) {
        ++hist[(keys[i + __builtin_ctz(match)] >> shift) & digit_mask];
        match &= static_cast<__mmask16>(match - 1);
      }
    }
#endif
    for (; i < ends[r]; ++i) {
      if ((keys[i] >> (32 - used)) == prefix) ++hist[(keys[i] >> shift) & digit_mask];
    }
  }
}

// The index of the `nth` (1-based) candidate whose key is `wanted`, walking the ranges in order;
// 16 keys are compared at once under AVX-512. The caller guarantees at least `nth` such candidates.
int64_t nth_equal_index(const uint32_t *keys, const int64_t *positions, const int64_t *begins, const int64_t *ends, int ranges,
                        uint32_t wanted, uint64_t nth) {
  uint64_t seen = 0;
  for (int r = 0; r < ranges; ++r) {
    int64_t i = begins[r];
#if defined(__AVX512F__)
    const __m512i wanted16 = _mm512_set1_epi32(static_cast<int>(wanted));
    for (; i + 16 <= ends[r]; i += 16) {
      __mmask16 equal = _mm512_cmpeq_epi32_mask(_mm512_loadu_si512(keys + i), wanted16);
      const int count = __builtin_popcount(equal);
      if (seen + static_cast<uint64_t>(count) >= nth) {
        for (uint64_t skip = nth - seen - 1; skip > 0; --skip) equal &= static_cast<__mmask16>(equal - 1);
        return positions[i + __builtin_ctz(equal)];
      }
      seen += static_cast<uint64_t>(count);
    }
#endif
    for (; i < ends[r]; ++i) {
      if (keys[i] == wanted && ++seen == nth) return positions[i];
    }
  }
  return std::numeric_limits<int64_t>::max();  // unreachable when the caller's count is right
}

// The positions i in [begin, end) with selected[i] != 0, ascending, from out on. Branch-free into a
// local buffer (the selected fraction is often near 0.2: branches would mispredict).
inline void write_selected_indices(const uint8_t *selected, int64_t begin, int64_t end, int64_t *out) {
  int64_t local[kBlock];
  for (int64_t i = begin; i < end; i += kBlock) {
    const int len = static_cast<int>(std::min<int64_t>(kBlock, end - i));
    int count = 0;
    for (int j = 0; j < len; ++j) {
      local[count] = i + j;
      count += selected[i + j];
    }
    std::memcpy(out, local, sizeof(int64_t) * static_cast<size_t>(count));
    out += count;
  }
}

// Up to this many scores one thread selects by nth_element on composite keys (below): the phases
// above have fixed costs (the 4096-bucket histograms, the 65536-score sample, the candidate scratch)
// of ~20 us, more than the whole selection of a candidate batch. Measured on the 2-core EPYC machine,
// one thread, k = n / 5 (topk_indices from Python): 4096 scores 18 against 36 us, 32768 110 against
// 168 us, 65536 388 against 397 us.
constexpr int64_t kSmallScores = 32768;

// The small form: composite (key << 32) | (2^32 - 1 - index), distinct and ordered like the stable
// descending order (higher key first, then the lower index); nth_element puts the k largest first, and
// the k-th of them holds the threshold key. Writes the same mask, indices and threshold as the phases.
aql_status select_small(const float *scores, int64_t n, int64_t k, uint8_t *mask, int64_t *indices, float *threshold) {
  // per calling thread, kept from call to call: at most kSmallScores * 9 bytes (288 KiB)
  thread_local std::vector<uint64_t> composite;
  thread_local std::vector<uint8_t> marks;
  composite.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    composite[i] = (static_cast<uint64_t>(float_key(scores[i])) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
  std::nth_element(composite.begin(), composite.begin() + (k - 1), composite.end(), std::greater<uint64_t>());
  if (threshold != nullptr) *threshold = key_to_float(static_cast<uint32_t>(composite[static_cast<size_t>(k - 1)] >> 32));
  if (mask == nullptr && indices == nullptr) return aql::ok();
  uint8_t *selected = mask;
  if (selected == nullptr) {
    marks.resize(static_cast<size_t>(n));
    selected = marks.data();
  }
  std::memset(selected, 0, static_cast<size_t>(n));
  for (int64_t j = 0; j < k; ++j) selected[0xffffffffu - static_cast<uint32_t>(composite[static_cast<size_t>(j)])] = 1;
  if (indices != nullptr) write_selected_indices(selected, 0, n, indices);
  return aql::ok();
}

aql_status select_topk(const float *scores, int64_t n, int64_t k, uint8_t *mask, int64_t *indices,
                       float *threshold) {
  if (k == 0) {
    if (mask != nullptr) std::memset(mask, 0, static_cast<size_t>(n));
    if (threshold != nullptr) *threshold = std::numeric_limits<float>::infinity();
    return aql::ok();
  }
  if (n <= kSmallScores) return select_small(scores, n, k, mask, indices, threshold);
  // Indices are compacted from a mask: the caller's, or a scratch one.
  std::unique_ptr<uint8_t[]> scratch_mask;  // every byte is written by the mask pass: no zero fill
  uint8_t *selected = mask;
  if (selected == nullptr && indices != nullptr) {
    scratch_mask.reset(new uint8_t[static_cast<size_t>(n)]);
    selected = scratch_mask.get();
  }

  // ---- 1-3: sampled top-digit range, mask + candidate compaction, exact pass after a miss -------
  // The scores are cut into fixed chunks, several per thread, handed out dynamically: a thread that
  // the OS preempts does not hold the others at a barrier. Chunk c writes its candidates from
  // output_begin(c) on (room for all its scores and kCompactSlack more); they stay there.
  const int threads = thread_count(n, kParallelScores);
  const int chunks = threads == 1 ? 1 : threads * kChunksPerThread;
  std::vector<uint64_t> hist(kBuckets, 0u);
  // The guess: the top digits of the sample ranks around k s / n (see sample_ranks), and when they span
  // at most 4 digits, the 22-bit prefixes of the samples in them: the candidates are the keys in
  // [low, high]. The mask pass writes key > provisional, the top of the digit (or prefix) that holds
  // the sample's own estimate of the k-th largest, so that phase 6 rewrites only the candidates
  // between that estimate and the exact threshold (~18k instead of ~100k of the 190k candidates for
  // 10^7 uniform scores, whose bytes lie on most lines of the mask).
  // Each sample is its own cache line: software prefetches keep kAhead of those misses in flight, and
  // the keys are kept for the second look.
  const int64_t samples = std::min(n, kSample);
  std::vector<uint32_t> sample_keys(static_cast<size_t>(samples));
  {
    // Each sample is a cache miss, ~10 ns apiece however far ahead they are prefetched (the misses a
    // core keeps in flight): with several threads each takes a share of the samples into its own
    // histogram (0.7 ms of one core for 65536 samples on the 2-core EPYC CI machine).
    const int parts = threads == 1 ? 1 : threads * kChunksPerThread;
    std::vector<uint64_t> part_hist(static_cast<size_t>(threads > 1 ? threads : 0) * kBuckets, 0u);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int part = 0; part < parts; ++part) {
#ifdef _OPENMP
      uint64_t *counts = threads == 1 ? hist.data() : part_hist.data() + static_cast<size_t>(omp_get_thread_num()) * kBuckets;
#else
      uint64_t *counts = hist.data();
#endif
      const int64_t first = chunk_begin(samples, part, parts), last = chunk_begin(samples, part + 1, parts);
      // Positions floor(j n / s) = j q + floor(j r / s), the second term carried without a division.
      const int64_t quotient = n / samples, remainder = n % samples;
      int64_t carry = first * remainder / samples, fraction = first * remainder % samples;
      // Prefetched into L2 (locality hint 1), 64 samples ahead: L2 keeps more misses in flight than
      // L1 (0.5-0.7 -> 0.3-0.4 ms for the 65536 samples on one core of the 2-core EPYC CI machine).
      constexpr int64_t kAhead = 64;
      int64_t ahead_carry = carry, ahead_fraction = fraction, ahead = first;
      const auto advance = [&](int64_t &j, int64_t &c, int64_t &f) {
        ++j;
        f += remainder;
        if (f >= samples) {
          f -= samples;
          ++c;
        }
      };
      for (int64_t step = 0; step < kAhead && ahead < last; ++step) {
        __builtin_prefetch(scores + ahead * quotient + ahead_carry, 0, 1);
        advance(ahead, ahead_carry, ahead_fraction);
      }
      for (int64_t j = first; j < last;) {
        if (ahead < last) {
          __builtin_prefetch(scores + ahead * quotient + ahead_carry, 0, 1);
          advance(ahead, ahead_carry, ahead_fraction);
        }
        const uint32_t key = float_key(scores[j * quotient + carry]);
        sample_keys[j] = key;
        ++counts[key >> (32 - kFirstBits)];
        advance(j, carry, fraction);
      }
    }
    for (int t = 0; t < (threads > 1 ? threads : 0); ++t) {
      for (int d = 0; d < kBuckets; ++d) hist[d] += part_hist[static_cast<size_t>(t) * kBuckets + d];
    }
  }
  int64_t rank_high = 0, rank_low = 0;
  sample_ranks(n, k, samples, &rank_high, &rank_low);
  const bool open_top = rank_high < 1, open_bottom = rank_low > samples;
  // The sample rank of the k-th largest, k s / n rounded, in [1, s].
  const int64_t rank_center = std::clamp<int64_t>(
      static_cast<int64_t>((static_cast<unsigned __int128>(k) * static_cast<uint64_t>(samples) + static_cast<uint64_t>(n / 2)) / static_cast<uint64_t>(n)),
      1, samples);
  const Pick sample_high = pick_bucket(hist.data(), kBuckets, open_top ? 1u : static_cast<uint64_t>(rank_high), true);
  const Pick sample_low = pick_bucket(hist.data(), kBuckets, open_bottom ? 1u : static_cast<uint64_t>(rank_low), true);
  const uint32_t center_digit = pick_bucket(hist.data(), kBuckets, static_cast<uint64_t>(rank_center), true).digit;
  const uint32_t low_digit = open_bottom ? 0u : sample_low.digit;
  const uint32_t high_digit = open_top ? kBuckets - 1u : sample_high.digit;
  constexpr int kDigitShift = 32 - kFirstBits, kSecondShift = 32 - kFirstBits - kRefineBits;
  uint32_t low = low_digit << kDigitShift;
  uint32_t high = (high_digit << kDigitShift) | ((1u << kDigitShift) - 1u);
  uint32_t provisional = (center_digit << kDigitShift) | ((1u << kDigitShift) - 1u);
  if (!open_top && !open_bottom && high_digit - low_digit < (kBuckets >> kRefineBits)) {
    // The 22-bit prefixes of the samples in those (at most 4) digits, as offsets from the lowest one.
    const uint32_t base = low_digit << kRefineBits, span = (high_digit + 1u) << kRefineBits;
    std::fill(hist.begin(), hist.end(), 0u);
    for (int64_t j = 0; j < samples; ++j) {
      const uint32_t prefix = sample_keys[j] >> kSecondShift;
      if (prefix >= base && prefix < span) ++hist[prefix - base];
    }
    // Ranks among them: sample_high.remaining = rank_high - (samples above high_digit); the center
    // rank lies between rank_high and rank_low.
    const uint64_t above_digits = static_cast<uint64_t>(rank_high) - sample_high.remaining;
    const uint32_t second_high = pick_bucket(hist.data(), kBuckets, sample_high.remaining, true).digit;
    const uint32_t second_low = pick_bucket(hist.data(), kBuckets, static_cast<uint64_t>(rank_low) - above_digits, true).digit;
    const uint32_t second_center = pick_bucket(hist.data(), kBuckets, static_cast<uint64_t>(rank_center) - above_digits, true).digit;
    low = (base + second_low) << kSecondShift;
    high = ((base + second_high) << kSecondShift) | ((1u << kSecondShift) - 1u);
    provisional = ((base + second_center) << kSecondShift) | ((1u << kSecondShift) - 1u);
  }
  provisional = std::clamp(provisional, low, high);
  // The candidate arrays: per calling thread, kept between calls (fresh pages for them cost ~0.5 ms
  // of page faults per call at n = 10^7), released after a call that filled many pages.
  // Chunk c writes its candidates from output_begin(c) on: its first score's position plus
  // kCompactSlack slots for each chunk before it (mask_and_compact's full-width stores).
  const auto output_begin = [&](int c) { return chunk_begin(n, c, chunks) + kCompactSlack * c; };
  CandidateScratch &scratch = candidate_scratch(static_cast<size_t>(n) + static_cast<size_t>(kCompactSlack) * static_cast<size_t>(chunks));
  uint32_t *const candidate_keys = scratch.keys.get();
  int64_t *const candidate_indices = scratch.indices.get();
  std::vector<int64_t> chunk_candidates(static_cast<size_t>(chunks), 0), chunk_above(static_cast<size_t>(chunks), 0);
  const auto compact_all = [&]() {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int c = 0; c < chunks; ++c) {
      const int64_t out = output_begin(c);
      chunk_above[c] = 0;
      chunk_candidates[c] = mask_and_compact(scores, chunk_begin(n, c, chunks), chunk_begin(n, c + 1, chunks), low, high,
                                             provisional, selected, candidate_keys, candidate_indices, out, &chunk_above[c]) -
                            out;
    }
  };
  compact_all();
  int64_t above = 0, in_range = 0;
  for (int c = 0; c < chunks; ++c) {
    above += chunk_above[c];
    in_range += chunk_candidates[c];
  }
  uint32_t key_prefix = 0;
  uint64_t remaining = 0;
  uint64_t bucket_count = 0;
  int prefix_bits = 0;
  if (above < k && k <= above + in_range) {  // the k-th largest is a candidate
    remaining = static_cast<uint64_t>(k - above);
    if ((low >> kSecondShift) == (high >> kSecondShift)) {  // the first two digits are known
      key_prefix = low >> kSecondShift;
      prefix_bits = kFirstBits + kRefineBits;
    } else if ((low >> kDigitShift) == (high >> kDigitShift)) {  // the first digit is known
      key_prefix = low >> kDigitShift;
      prefix_bits = kFirstBits;
    }
  } else {  // a miss: the exact top-digit histogram, then the mask and the candidates again
    std::vector<uint64_t> chunk_hist(static_cast<size_t>(chunks) * kBuckets);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int c = 0; c < chunks; ++c) {
      histogram_top_digit(scores, chunk_begin(n, c, chunks), chunk_begin(n, c + 1, chunks),
                          chunk_hist.data() + static_cast<size_t>(c) * kBuckets);
    }
    std::fill(hist.begin(), hist.end(), 0u);
    for (int c = 0; c < chunks; ++c) {
      const uint64_t *counts = chunk_hist.data() + static_cast<size_t>(c) * kBuckets;
      for (int d = 0; d < kBuckets; ++d) hist[d] += counts[d];
    }
    const Pick pick = pick_bucket(hist.data(), kBuckets, static_cast<uint64_t>(k), true);
    key_prefix = pick.digit;
    low = pick.digit << kDigitShift;
    high = low | ((1u << kDigitShift) - 1u);
    prefix_bits = kFirstBits;
    remaining = pick.remaining;
    bucket_count = pick.bucket_count;
    provisional = high;
    compact_all();
  }
  // Chunk c's candidates are at [begins[c], ends[c]): the passes below walk those ranges (moving them
  // side by side cost ~1 ms for the 625k candidates of 10^7 uniform scores on the CI-class CPU).
  std::vector<int64_t> begins(static_cast<size_t>(chunks)), ends(static_cast<size_t>(chunks));
  int64_t candidates = 0;
  for (int c = 0; c < chunks; ++c) {
    begins[c] = output_begin(c);
    ends[c] = begins[c] + chunk_candidates[c];
    candidates += chunk_candidates[c];
  }
  const auto histogram = [&](int buckets, auto accept, auto digit_of) {
    histogram_ranges(begins.data(), ends.data(), chunks, candidates, buckets, accept, digit_of, hist.data());
  };

  // ---- 4: exact key on the candidates (12 + 10 + 10 bits, less what the range fixed) -------------
  const uint32_t *keys = candidate_keys;
  const int64_t *positions = candidate_indices;
  while (prefix_bits < 32) {
    const int bits = prefix_bits == 0 ? kFirstBits : std::min(kRefineBits, 32 - prefix_bits);
    const int shift = 32 - prefix_bits - bits;
    const uint32_t prefix = key_prefix;
    const int used = prefix_bits;
    if (used > 0 && thread_count(candidates, kParallelCandidates) == 1) {
      key_digit_histogram(keys, begins.data(), ends.data(), chunks, used, prefix, shift, bits, hist.data());
    } else {
      histogram(
          1 << bits, [&](int64_t i) { return used == 0 || (keys[i] >> (32 - used)) == prefix; },
          [&](int64_t i) { return (keys[i] >> shift) & ((1u << bits) - 1u); });
    }
    const Pick pick = pick_bucket(hist.data(), 1 << bits, remaining, true);
    key_prefix = (key_prefix << bits) | pick.digit;
    remaining = pick.remaining;
    bucket_count = pick.bucket_count;
    prefix_bits += bits;
  }
  const uint32_t threshold_key = key_prefix;
  const uint64_t equal_count = bucket_count;  // elements whose key is threshold_key
  const uint64_t equal_taken = remaining;     // how many of them the first k take

  // ---- 5: the index cutoff among threshold-equal elements ---------------------------------------
  // Each chunk's candidates are stored in ascending index order and the chunks follow each other, so
  // the cutoff is the index of the equal_taken-th threshold-equal candidate met walking them in
  // order: one scan that stops there (the radix passes over the indices that the GPU needs took 0.16
  // ms for the few ties of 10^7 torch.rand scores, one core of the 2-core EPYC CI machine).
  int64_t cutoff = std::numeric_limits<int64_t>::max();
  if (equal_taken < equal_count) cutoff = nth_equal_index(keys, positions, begins.data(), ends.data(), chunks, threshold_key, equal_taken);

  // ---- 6: the candidates whose provisional mask byte (key > provisional) is wrong -----------------
  if (selected != nullptr) {
#pragma omp parallel for num_threads(thread_count(candidates, kParallelCandidates)) schedule(dynamic, 1)
    for (int c = 0; c < chunks; ++c) {
      int64_t i = begins[c];
#if defined(__AVX512F__)
      // 16 keys at a time; only the lanes whose byte changes (or that tie with the threshold) are
      // visited, so most positions are never read (0.3 -> 0.2 ms for 10^7 uniform scores, one core).
      const __m512i threshold16 = _mm512_set1_epi32(static_cast<int>(threshold_key));
      const __m512i provisional16 = _mm512_set1_epi32(static_cast<int>(provisional));
      for (; i + 16 <= ends[c]; i += 16) {
        const __m512i key16 = _mm512_loadu_si512(keys + i);
        const __mmask16 above = _mm512_cmpgt_epu32_mask(key16, threshold16);
        __mmask16 visit = static_cast<__mmask16>((above ^ _mm512_cmpgt_epu32_mask(key16, provisional16)) |
                                                 _mm512_cmpeq_epu32_mask(key16, threshold16));
        while (visit != 0) {
          const int lane = __builtin_ctz(visit);
          const int64_t at = positions[i + lane];
          selected[at] = static_cast<uint8_t>(((above >> lane) & 1u) | ((keys[i + lane] == threshold_key) & (at <= cutoff)));
          visit &= static_cast<__mmask16>(visit - 1);
        }
      }
#endif
      for (; i < ends[c]; ++i) {
        const uint32_t key = keys[i];
        const bool wanted = (key > threshold_key) | ((key == threshold_key) & (positions[i] <= cutoff));
        if (wanted != (key > provisional)) selected[positions[i]] = wanted;
      }
    }
  }
  scratch.release_if_large(candidates);
  if (threshold != nullptr) *threshold = key_to_float(threshold_key);

  // ---- 7: ascending indices from the mask (count, exclusive scan, write) ------------------------
  if (indices != nullptr) {
    std::vector<int64_t> offset(static_cast<size_t>(chunks) + 1, 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int c = 0; c < chunks; ++c) {
      int64_t count = 0;
      for (int64_t i = chunk_begin(n, c, chunks), end = chunk_begin(n, c + 1, chunks); i < end; ++i) count += selected[i];
      offset[c + 1] = count;
    }
    for (int c = 0; c < chunks; ++c) offset[c + 1] += offset[c];
    if (offset[chunks] != k) {
      return aql::fail(AQL_ERR_INTERNAL, "aql_topk_select: internal error, selected %lld of k = %lld",
                       static_cast<long long>(offset[chunks]), static_cast<long long>(k));
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int c = 0; c < chunks; ++c)
      write_selected_indices(selected, chunk_begin(n, c, chunks), chunk_begin(n, c + 1, chunks), indices + offset[c]);
  }
  return aql::ok();
}

}  // namespace

#if defined(__AVX512F__)
#pragma GCC diagnostic pop
#endif

namespace aql::cpu::AQL_CPU_VARIANT {

aql_status topk_select(const float *scores, int64_t n, int64_t k, uint8_t *mask, int64_t *indices,
                       float *threshold) {
  if (n < 0) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_topk_select: n must be >= 0, got %lld", static_cast<long long>(n));
  if (k < 0 || k > n) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_topk_select: k must be in [0, %lld], got %lld",
                     static_cast<long long>(n), static_cast<long long>(k));
  }
  if (scores == nullptr && n > 0) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_topk_select: scores is NULL");
  try {
    return select_topk(scores, n, k, mask, indices, threshold);
  } catch (const std::bad_alloc &) {
    return aql::fail(AQL_ERR_OUT_OF_MEMORY, "aql_topk_select: out of host memory for n = %lld",
                     static_cast<long long>(n));
  }
}

aql_status digit_histogram(const float *scores, int64_t n, uint32_t prefix, int32_t prefix_bits,
                           int32_t digit_bits, int64_t *out) {
  if (n < 0) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_digit_histogram: n must be >= 0, got %lld", static_cast<long long>(n));
  if (digit_bits < 1 || digit_bits > 16) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_digit_histogram: digit_bits must be in [1, 16], got %d", digit_bits);
  }
  if (prefix_bits < 0 || prefix_bits + digit_bits > 32) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT,
                     "aql_digit_histogram: prefix_bits must be in [0, %d] (prefix_bits + digit_bits <= 32), got %d",
                     32 - digit_bits, prefix_bits);
  }
  if (prefix_bits < 32 && (static_cast<uint64_t>(prefix) >> prefix_bits) != 0) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_digit_histogram: prefix must be < 2^%d, got %u", prefix_bits, prefix);
  }
  if ((scores == nullptr && n > 0) || out == nullptr) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_digit_histogram: scores or out is NULL");
  }
  const int buckets = 1 << digit_bits;
  const int shift = 32 - digit_bits;
  try {
    std::vector<uint64_t> hist(static_cast<size_t>(buckets));
    histogram_candidates(
        n, buckets,
        [&](int64_t i) {
          return prefix_bits == 0 || (float_key(scores[i]) >> (32 - prefix_bits)) == prefix;
        },
        [&](int64_t i) { return (float_key(scores[i]) << prefix_bits) >> shift; }, hist.data());
    for (int d = 0; d < buckets; ++d) out[d] = static_cast<int64_t>(hist[d]);
  } catch (const std::bad_alloc &) {
    return aql::fail(AQL_ERR_OUT_OF_MEMORY, "aql_digit_histogram: out of host memory");
  }
  return aql::ok();
}

}  // namespace aql::cpu::AQL_CPU_VARIANT
