// Exact top-k selection on the GPU: radix select over order-preserving keys, with no host
// synchronisation. csrc/cpu/select.cpp runs the same phases on the CPU (and is what CI tests).
//
// Order: scores become uint32 keys (NaN -> 0, below -inf; -0.0 -> the key of +0.0); the selected set
// is the first k of a stable descending sort, i.e. the k largest composites (key, -index). Radix
// select over that composite, most significant digit first (the GPU radix select of Alabi et al.,
// "Fast k-selection algorithms for GPUs", ACM JEA 2012; the sampled first digit follows the
// splitter sampling of SampleSelect, Ribizel and Anzt, "Parallel selection on GPUs", Parallel
// Computing 2020; the stable tie-break by index digits is ours). Phases, all on the caller's stream:
//   init_kernel              state and the 12-bit histogram zeroed (one launch instead of a memset)
//   sample_kernel            12-bit digit histogram of 65536 evenly spaced scores; its last block
//                            picks the top digits of the sample ranks k s / n -+ 6 standard
//                            deviations                                 (0.5 MB of reads at most)
//   sample_refine_kernel     when they span at most 4 digits: the 22-bit key prefixes of the
//                            samples in those digits, so that the candidate range [low, high] is in
//                            22-bit prefixes
//   compact_kernel           mask = key > high for every score, the keys and indices of the scores
//                            in [low, high] appended to a candidate list, and the count above high;
//                            its last block checks above < k <= above + candidates (the k-th largest
//                            is a candidate) and flags a miss  (read 1 of scores, the mask write)
//   only after a miss (the kernels read the flag and return at once otherwise): the exact 12-bit
//   histogram of every score, its bucket, and compact_kernel again with that single bucket
//                                                                       (reads 2 and 3 of scores)
//   refine_kernel            12 + 10 + 10 key bits over the candidates, less what the range fixes
//                            already (its common top digit or 22-bit prefix) -> the exact k-th key T
//                            and the number t of T-equal elements that the first k take; then, only
//                            when t is less than their number, index digits of the T-equal
//                            candidates -> the cutoff index
//   scatter_kernel           candidates with key > T, or key == T and index <= cutoff, set in the
//                            mask; the threshold written
//   tile_count / scan / tile_write, only for indices: per-4096-byte tile counts of the mask (16-byte
//                            loads), exclusive scan, and a block scan that writes indices ascending
// Every histogram kernel picks its own bucket: the last block to finish (a ticket counter after a
// fence, as in the CUDA threadFenceReduction sample) scans the global histogram from L2 and zeroes
// it for the next pass, so no separate pick or memset launches sit between the passes.
// Traffic for the mask: one read of the scores (4 bytes per element) and one write of the mask (1
// byte), plus 8 bytes per candidate (uint32 key and index when n <= 2^32) for the compaction and
// 4-8 bytes per candidate and refinement pass; candidates are the scores in the sampled range (about
// 2% for uniform [0, 1) scores at k = 0.2 n, less for spread-out ones; all of them for adversarial
// ones such as all-equal scores). Indices add two reads of the mask (2 bytes per element) and the
// 8k-byte write. Every data-dependent size (the candidate count, the flags) lives in device memory:
// kernels are launched for the worst case and grid-stride over what they read; grids are one wave
// (blocks resident at once per SM x SMs), so no block of a grid-stride loop waits for another wave.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "../common.h"
#include "../select_common.h"

namespace {

using aql::select::float_key;
using aql::select::index_bits;
using aql::select::key_to_float;
using aql::select::kFirstBits;
using aql::select::kRefineBits;
using aql::select::kSample;
using aql::select::sample_ranks;

constexpr int kFirstBuckets = 1 << kFirstBits;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;                    // loads in flight per thread in the scoring pass
constexpr int kTile = 4096;                   // mask bytes per block step of the index write: 16 per thread
constexpr int kTileBytesPerThread = kTile / kThreads;
constexpr int kSamplesPerThread = 4;
constexpr uint32_t kRefineSpan = kFirstBuckets >> kRefineBits;  // top digits the sample's second look covers
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr size_t kAlign = 256;

struct SelectState {
  unsigned long long remaining;        // rank (1-based) of the wanted element among what is left
  unsigned long long bucket_count;     // elements in the last bucket picked
  unsigned long long candidate_count;  // candidates compacted
  unsigned long long above_count;      // scores whose top digit is above the candidate range
  unsigned long long index_prefix;     // digits of the cutoff index found so far
  unsigned long long sample_above;     // samples above the guessed top digit
  unsigned int key_prefix;             // digits of the threshold key found so far
  unsigned int key_bits;               // how many bits of the key key_prefix holds
  unsigned int low_key, high_key;      // candidates: low_key <= key <= high_key
  unsigned int fallback;               // 1 after the sampled range missed: exact top-digit pass
  unsigned int need_index;             // 1 when only some threshold-equal elements are taken
  unsigned int sample_refine;          // 1 when the sampled range spans <= 4 top digits: 10 more bits
  unsigned int ticket;                 // blocks finished in the current kernel
};

struct Layout {
  size_t state, hist, tile_counts, candidate_keys, candidate_indices, scratch_mask, total;
};

size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

Layout layout_for(int64_t n) {
  const size_t count = static_cast<size_t>(n);
  const size_t tiles = (count + kTile - 1) / kTile;
  Layout l;
  l.state = 0;
  l.hist = align_up(sizeof(SelectState));
  l.tile_counts = l.hist + align_up(sizeof(unsigned long long) * kFirstBuckets);
  l.candidate_keys = l.tile_counts + align_up(sizeof(unsigned long long) * (tiles + 1));
  l.candidate_indices = l.candidate_keys + align_up(sizeof(uint32_t) * count);
  l.scratch_mask = l.candidate_indices + align_up(sizeof(int64_t) * count);
  l.total = l.scratch_mask + align_up(count);
  return l;
}

// Scores as items of VEC consecutive floats (float4 loads when the pointer allows). Streaming loads:
// the scores are read once on the fast path and do not fit in L2 at the sizes where time matters.
template <int VEC>
__device__ __forceinline__ void load_keys(const float *__restrict__ scores, int64_t item, uint32_t (&keys)[VEC]) {
  if constexpr (VEC == 4) {
    const float4 q = __ldcs(reinterpret_cast<const float4 *>(scores) + item);
    keys[0] = float_key(q.x);
    keys[1] = float_key(q.y);
    keys[2] = float_key(q.z);
    keys[3] = float_key(q.w);
  } else {
    keys[0] = float_key(__ldcs(scores + item));
  }
}

// Reads of values that other blocks of the same kernel wrote with atomics: from L2, not L1.
template <class T>
__device__ __forceinline__ T load_coherent(const T *address) {
  return *reinterpret_cast<const volatile T *>(address);
}

// True in every thread of the last block of the grid to get here. Each thread fences its own
// atomics before the block takes a ticket, and the last block fences again before it reads.
__device__ __forceinline__ bool last_block_done(SelectState *state) {
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&state->ticket, 1u) == gridDim.x - 1u;
  __syncthreads();
  if (is_last) __threadfence();
  return is_last;
}

struct Found {
  int digit;                 // the bucket that holds the wanted element
  unsigned long long before; // elements in the buckets walked before it
  unsigned long long count;  // elements in it
};

// Every thread of the block: the bucket holding the rank-th element (1-based), walking from the top
// bucket down (descending) or from bucket 0 up; rank <= sum(hist) by construction. Each thread loads
// its 16 (or fewer) buckets at once from L2 and the block scans the per-thread sums: a walk by one
// warp would wait for 128 dependent L2 reads per lane over 4096 buckets.
constexpr int kFindPerThread = kFirstBuckets / kThreads;

__device__ Found block_find(const unsigned long long *hist, int buckets, unsigned long long rank, bool descending) {
  __shared__ unsigned long long warp_sums[kWarps];
  __shared__ Found result;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int per_thread = (buckets + kThreads - 1) / kThreads;
  const int first = threadIdx.x * per_thread;
  unsigned long long values[kFindPerThread];
  unsigned long long sum = 0;
#pragma unroll
  for (int j = 0; j < kFindPerThread; ++j) {
    const int p = first + j;
    values[j] = j < per_thread && p < buckets ? __ldcg(&hist[descending ? buckets - 1 - p : p]) : 0ull;
    sum += values[j];
  }
  unsigned long long inclusive = sum;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned long long other = __shfl_up_sync(kFullWarp, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  if (threadIdx.x == 0) result = Found{descending ? 0 : buckets - 1, 0ull, 0ull};
  __syncthreads();
  for (int w = 0; w < warp; ++w) inclusive += warp_sums[w];
  unsigned long long before = inclusive - sum;
  if (before < rank && rank <= inclusive) {  // exactly one thread
    bool found = false;
#pragma unroll
    for (int j = 0; j < kFindPerThread; ++j) {
      if (!found && j < per_thread) {
        if (before + values[j] >= rank) {
          const int p = first + j;
          result = Found{descending ? buckets - 1 - p : p, before, values[j]};
          found = true;
        } else {
          before += values[j];
        }
      }
    }
  }
  __syncthreads();
  const Found answer = result;
  __syncthreads();  // result and warp_sums are reused by the next call
  return answer;
}

// Per-block uint32 counters in shared memory, added into the global histogram (nonzero ones only).
__device__ __forceinline__ void merge_counts(const uint32_t *counts, int buckets, unsigned long long *hist) {
  __syncthreads();
  for (int d = threadIdx.x; d < buckets; d += blockDim.x) {
    if (counts[d] != 0u) atomicAdd(&hist[d], static_cast<unsigned long long>(counts[d]));
  }
}

// Last block: the histogram back to zeros for the next pass, and the ticket.
__device__ __forceinline__ void reset_after_pick(SelectState *state, unsigned long long *hist, int buckets) {
  __syncthreads();  // block_find has read the histogram
  for (int d = threadIdx.x; d < buckets; d += blockDim.x) hist[d] = 0ull;
  if (threadIdx.x == 0) state->ticket = 0u;
}

__global__ void init_kernel(SelectState *state, unsigned long long *hist, int64_t k) {
  for (int d = threadIdx.x; d < kFirstBuckets; d += blockDim.x) hist[d] = 0ull;
  if (threadIdx.x == 0) {
    state->remaining = static_cast<unsigned long long>(k);
    state->bucket_count = 0;
    state->candidate_count = 0;
    state->above_count = 0;
    state->index_prefix = 0;
    state->key_prefix = 0;
    state->key_bits = 0;
    state->sample_above = 0;
    state->low_key = 0u;
    state->high_key = 0xffffffffu;
    state->sample_refine = 0;
    state->fallback = 0;
    state->need_index = 0;
    state->ticket = 0;
  }
}

__global__ void write_value_kernel(float *out, float value) { *out = value; }

// ---- the sampled guess of the top-digit range ------------------------------------------------------
// This thread's sample keys (valid[u] is false past the end of the sample). The grid covers the sample:
// kSamplesPerThread loads per thread, all issued before any is used (each is a separate DRAM sector, so
// a loop of load-then-count would wait for them one by one).
__device__ __forceinline__ void load_sample_keys(const float *__restrict__ scores, int64_t n, int64_t samples,
                                                 uint32_t (&keys)[kSamplesPerThread], bool (&valid)[kSamplesPerThread]) {
  const int64_t quotient = n / samples, remainder = n % samples;  // j n / s without overflow
  float values[kSamplesPerThread];
#pragma unroll
  for (int u = 0; u < kSamplesPerThread; ++u) {
    const int64_t j = (static_cast<int64_t>(blockIdx.x) * kSamplesPerThread + u) * blockDim.x + threadIdx.x;
    valid[u] = j < samples;
    values[u] = valid[u] ? scores[j * quotient + (j * remainder) / samples] : 0.0f;
  }
#pragma unroll
  for (int u = 0; u < kSamplesPerThread; ++u) keys[u] = float_key(values[u]);
}

// Sample j is score floor(j n / s) (evenly spaced, deterministic). The last block turns the sample
// ranks rank_high <= rank_low (descending, 1-based; 0 and s + 1 mean "open") into the digit range.
__global__ void sample_kernel(const float *__restrict__ scores, int64_t n, int64_t samples, int64_t rank_high,
                              int64_t rank_low, SelectState *state, unsigned long long *__restrict__ hist) {
  __shared__ uint32_t counts[kFirstBuckets];
  for (int d = threadIdx.x; d < kFirstBuckets; d += blockDim.x) counts[d] = 0u;
  __syncthreads();
  uint32_t keys[kSamplesPerThread];
  bool valid[kSamplesPerThread];
  load_sample_keys(scores, n, samples, keys, valid);
#pragma unroll
  for (int u = 0; u < kSamplesPerThread; ++u)
    if (valid[u]) atomicAdd(&counts[keys[u] >> (32 - kFirstBits)], 1u);
  merge_counts(counts, kFirstBuckets, hist);
  if (!last_block_done(state)) return;
  // Both calls in every thread (block_find has barriers); the open ends ignore theirs.
  const Found high = block_find(hist, kFirstBuckets, rank_high < 1 ? 1ull : static_cast<unsigned long long>(rank_high), true);
  const Found low = block_find(hist, kFirstBuckets, rank_low > samples ? 1ull : static_cast<unsigned long long>(rank_low), true);
  if (threadIdx.x == 0) {
    const bool open_top = rank_high < 1, open_bottom = rank_low > samples;
    const uint32_t low_digit = open_bottom ? 0u : static_cast<uint32_t>(low.digit);
    const uint32_t high_digit = open_top ? kFirstBuckets - 1u : static_cast<uint32_t>(high.digit);
    state->low_key = low_digit << (32 - kFirstBits);
    state->high_key = (high_digit << (32 - kFirstBits)) | ((1u << (32 - kFirstBits)) - 1u);
    state->sample_refine = !open_top && !open_bottom && high_digit - low_digit < kRefineSpan ? 1u : 0u;
    state->sample_above = high.before;  // samples above high_digit
  }
  reset_after_pick(state, hist, kFirstBuckets);
}

// When the sample ranks fall in at most kRefineSpan adjacent top digits, the 22-bit key prefixes of the
// samples in them (one 4096-bin histogram: prefix - low digit * 1024) narrow the candidate range to
// 22-bit prefixes: for uniform [0, 1) scores at k = 0.2 n, from the 6.25% of the scores in one digit
// to about 2%; every candidate costs ~8 bytes written and 4-8 bytes read per later pass, plus a
// scattered mask byte.
__global__ void sample_refine_kernel(const float *__restrict__ scores, int64_t n, int64_t samples, int64_t rank_high,
                                     int64_t rank_low, SelectState *state, unsigned long long *__restrict__ hist) {
  if (state->sample_refine == 0u) return;
  constexpr int kShift = 32 - kFirstBits - kRefineBits;  // the low 10 bits below a 22-bit prefix
  __shared__ uint32_t counts[kFirstBuckets];
  for (int d = threadIdx.x; d < kFirstBuckets; d += blockDim.x) counts[d] = 0u;
  __syncthreads();
  const uint32_t base = (state->low_key >> (32 - kFirstBits)) << kRefineBits;  // lowest 22-bit prefix
  const uint32_t span = ((state->high_key >> (32 - kFirstBits)) + 1u) << kRefineBits;  // one past the highest
  uint32_t keys[kSamplesPerThread];
  bool valid[kSamplesPerThread];
  load_sample_keys(scores, n, samples, keys, valid);
#pragma unroll
  for (int u = 0; u < kSamplesPerThread; ++u) {
    const uint32_t prefix = keys[u] >> kShift;
    if (valid[u] && prefix >= base && prefix < span) atomicAdd(&counts[prefix - base], 1u);
  }
  merge_counts(counts, kFirstBuckets, hist);
  if (!last_block_done(state)) return;
  const unsigned long long above = state->sample_above;
  const Found high = block_find(hist, kFirstBuckets, static_cast<unsigned long long>(rank_high) - above, true);
  const Found low = block_find(hist, kFirstBuckets, static_cast<unsigned long long>(rank_low) - above, true);
  if (threadIdx.x == 0) {
    state->low_key = (base + static_cast<uint32_t>(low.digit)) << kShift;
    state->high_key = ((base + static_cast<uint32_t>(high.digit)) << kShift) | ((1u << kShift) - 1u);
  }
  reset_after_pick(state, hist, kFirstBuckets);
}

// ---- mask above the range, compaction of the range --------------------------------------------------
// Each block step covers kThreads x kUnroll items (4096 scores with float4 loads): the loads of a
// thread are issued together, the mask goes out 4 bytes per store, and candidate slots are reserved
// with one atomicAdd per block step (a block scan of the per-thread counts). All blocks reserve from
// the same counter: one atomic per warp would put ~800k same-address atomics on it at n = 1e8, one per
// step of 4096 scores puts ~24k. fallback_pass: run only after a miss (the range is then one digit).
template <int VEC, class Index>
__global__ void __launch_bounds__(kThreads) compact_kernel(const float *__restrict__ scores, int64_t n,
                                                           uint8_t *__restrict__ mask, SelectState *state,
                                                           uint32_t *__restrict__ candidate_keys,
                                                           Index *__restrict__ candidate_indices, int fallback_pass,
                                                           int64_t k) {
  if (fallback_pass && state->fallback == 0u) return;
  // Double-buffered by step parity: two barriers per step instead of three.
  __shared__ unsigned warp_offsets[2][kWarps];
  __shared__ unsigned long long block_base[2];
  const uint32_t low = state->low_key, high = state->high_key;
  unsigned long long *counter = &state->candidate_count;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t items = n / VEC;
  const int64_t per_step = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * per_step;
  unsigned long long above_total = 0;
  int parity = 0;
  // Block-uniform trip count: every thread runs every step (there are __syncthreads inside).
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * per_step; base < items; base += stride, parity ^= 1) {
    uint32_t keys[kUnroll][VEC];
    if (base + per_step <= items) {  // a full step: the loads go out back to back, with no branches between
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_keys<VEC>(scores, base + u * kThreads + threadIdx.x, keys[u]);
    } else {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t item = base + u * kThreads + threadIdx.x;
        if (item < items) {
          load_keys<VEC>(scores, item, keys[u]);
        } else {
#pragma unroll
          for (int q = 0; q < VEC; ++q) keys[u][q] = 0u;
        }
      }
    }
    unsigned flags = 0u;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t item = base + u * kThreads + threadIdx.x;
      if (item >= items) continue;
      uint8_t above[VEC];
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        const uint32_t key = keys[u][q];
        above[q] = key > high ? 1 : 0;
        above_total += above[q];
        flags |= static_cast<unsigned>(key - low <= high - low) << (u * VEC + q);  // low <= key <= high
      }
      if (mask != nullptr) {
        if constexpr (VEC == 4) {
          reinterpret_cast<uchar4 *>(mask)[item] = make_uchar4(above[0], above[1], above[2], above[3]);
        } else {
          mask[item] = above[0];
        }
      }
    }
    const unsigned count = static_cast<unsigned>(__popc(flags));
    unsigned inclusive = count;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const unsigned other = __shfl_up_sync(kFullWarp, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_offsets[parity][warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      const unsigned mine = lane < kWarps ? warp_offsets[parity][lane] : 0u;
      unsigned scanned = mine;
      for (int offset = 1; offset < kWarps; offset <<= 1) {
        const unsigned other = __shfl_up_sync(kFullWarp, scanned, offset);
        if (lane >= offset) scanned += other;
      }
      if (lane < kWarps) warp_offsets[parity][lane] = scanned - mine;
      if (lane == kWarps - 1) {
        block_base[parity] = scanned != 0u ? atomicAdd(counter, static_cast<unsigned long long>(scanned)) : 0ull;
      }
    }
    __syncthreads();
    if (flags != 0u) {
      unsigned long long position = block_base[parity] + warp_offsets[parity][warp] + (inclusive - count);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          if (flags & (1u << (u * VEC + q))) {
            candidate_keys[position] = keys[u][q];
            candidate_indices[position] = static_cast<Index>((base + u * kThreads + threadIdx.x) * VEC + q);
            ++position;
          }
        }
      }
    }
  }
  if (VEC > 1 && blockIdx.x == 0) {  // the n % VEC last scores (at most 3): one atomic each
    const int64_t i = items * VEC + threadIdx.x;
    if (i < n) {
      const uint32_t key = float_key(scores[i]);
      if (mask != nullptr) mask[i] = key > high ? 1 : 0;
      above_total += key > high ? 1u : 0u;
      if (key - low <= high - low) {
        const unsigned long long position = atomicAdd(counter, 1ull);
        candidate_keys[position] = key;
        candidate_indices[position] = static_cast<Index>(i);
      }
    }
  }
  if (fallback_pass) return;  // the exact bucket's rank is known already
  for (int offset = 16; offset > 0; offset >>= 1) above_total += __shfl_down_sync(kFullWarp, above_total, offset);
  if (lane == 0 && above_total != 0ull) atomicAdd(&state->above_count, above_total);
  if (!last_block_done(state)) return;
  if (threadIdx.x == 0) {
    const unsigned long long above = load_coherent(&state->above_count);
    const unsigned long long candidates = load_coherent(counter);
    const unsigned long long wanted = static_cast<unsigned long long>(k);
    if (above < wanted && wanted <= above + candidates) {
      state->remaining = wanted - above;
      if ((low >> (32 - kFirstBits - kRefineBits)) == (high >> (32 - kFirstBits - kRefineBits))) {
        state->key_prefix = low >> (32 - kFirstBits - kRefineBits);  // the first two digits are known
        state->key_bits = kFirstBits + kRefineBits;
      } else if ((low >> (32 - kFirstBits)) == (high >> (32 - kFirstBits))) {
        state->key_prefix = low >> (32 - kFirstBits);  // the first digit is known
        state->key_bits = kFirstBits;
      }
    } else {  // a miss: start over with the exact top-digit histogram
      state->fallback = 1u;
      state->candidate_count = 0ull;
    }
    state->ticket = 0u;
  }
}

// ---- exact top-digit histogram, only after a miss ---------------------------------------------------
template <int VEC>
__global__ void __launch_bounds__(kThreads) histogram_scores_kernel(const float *__restrict__ scores, int64_t n,
                                                                    SelectState *state,
                                                                    unsigned long long *__restrict__ hist) {
  if (state->fallback == 0u) return;
  __shared__ uint32_t counts[kFirstBuckets];
  for (int d = threadIdx.x; d < kFirstBuckets; d += blockDim.x) counts[d] = 0u;
  __syncthreads();
  const int64_t items = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < items; item += stride) {
    uint32_t keys[VEC];
    load_keys<VEC>(scores, item, keys);
#pragma unroll
    for (int q = 0; q < VEC; ++q) atomicAdd(&counts[keys[q] >> (32 - kFirstBits)], 1u);
  }
  if (VEC > 1 && blockIdx.x == 0) {  // the n % VEC last scores
    const int64_t i = items * VEC + threadIdx.x;
    if (i < n) atomicAdd(&counts[float_key(scores[i]) >> (32 - kFirstBits)], 1u);
  }
  merge_counts(counts, kFirstBuckets, hist);
  if (!last_block_done(state)) return;
  const unsigned long long rank = state->remaining;  // k
  const Found found = block_find(hist, kFirstBuckets, rank, true);
  if (threadIdx.x == 0) {
    state->key_prefix = static_cast<unsigned>(found.digit);
    state->low_key = static_cast<uint32_t>(found.digit) << (32 - kFirstBits);
    state->high_key = state->low_key | ((1u << (32 - kFirstBits)) - 1u);
    state->key_bits = kFirstBits;
    state->remaining = rank - found.before;
    state->bucket_count = found.count;
  }
  reset_after_pick(state, hist, kFirstBuckets);
}

// ---- refinement over the candidates -------------------------------------------------------------
// Histogram of the digit at `shift` (width `bits`) over the candidates that match the prefix found so
// far: of the key (index_pass == 0; runs only while the key has 32 - shift - bits known bits) or, among
// threshold-equal candidates and only when some of them are left out, of the index. The last block
// picks the digit.
template <class Index>
__global__ void __launch_bounds__(kThreads) refine_kernel(const uint32_t *__restrict__ candidate_keys,
                                                          const Index *__restrict__ candidate_indices,
                                                          SelectState *state, int index_pass, int shift, int bits,
                                                          unsigned long long *__restrict__ hist) {
  if (index_pass ? state->need_index == 0u : state->key_bits != static_cast<unsigned>(32 - shift - bits)) return;
  __shared__ uint32_t counts[kFirstBuckets];
  const int buckets = 1 << bits;
  for (int d = threadIdx.x; d < buckets; d += blockDim.x) counts[d] = 0u;
  __syncthreads();
  const int64_t count = static_cast<int64_t>(state->candidate_count);
  const uint32_t key_prefix = state->key_prefix;
  const unsigned key_bits = state->key_bits;
  const unsigned long long index_prefix = state->index_prefix;
  const uint32_t digit_mask = static_cast<uint32_t>(buckets - 1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < count; c += stride) {
    const uint32_t key = candidate_keys[c];
    if (!index_pass) {
      if (key_bits == 0u || (key >> (shift + bits)) == key_prefix) atomicAdd(&counts[(key >> shift) & digit_mask], 1u);
    } else if (key == key_prefix) {
      const unsigned long long index = static_cast<unsigned long long>(candidate_indices[c]);
      if ((index >> (shift + bits)) == index_prefix) {
        atomicAdd(&counts[static_cast<uint32_t>(index >> shift) & digit_mask], 1u);
      }
    }
  }
  merge_counts(counts, buckets, hist);
  if (!last_block_done(state)) return;
  const unsigned long long rank = state->remaining;
  const Found found = block_find(hist, buckets, rank, !index_pass);
  if (threadIdx.x == 0) {
    state->remaining = rank - found.before;
    state->bucket_count = found.count;
    if (index_pass) {
      state->index_prefix = (index_prefix << bits) | static_cast<unsigned long long>(found.digit);
    } else {
      state->key_prefix = (key_prefix << bits) | static_cast<uint32_t>(found.digit);
      state->key_bits = key_bits + static_cast<unsigned>(bits);
      if (key_bits + bits == 32u) state->need_index = rank - found.before < found.count ? 1u : 0u;
    }
  }
  reset_after_pick(state, hist, buckets);
}

// Candidates into the mask, and the threshold. The compaction pass wrote 0 at every candidate: only the
// selected ones are written (about half of them), so fewer mask sectors are touched again.
template <class Index>
__global__ void scatter_kernel(const uint32_t *__restrict__ candidate_keys, const Index *__restrict__ candidate_indices,
                               const SelectState *state, uint8_t *__restrict__ mask, float *threshold) {
  const uint32_t threshold_key = state->key_prefix;
  if (threshold != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *threshold = key_to_float(threshold_key);
  if (mask == nullptr) return;
  const int64_t count = static_cast<int64_t>(state->candidate_count);
  const unsigned long long cutoff = state->need_index ? state->index_prefix : ~0ull;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < count; c += stride) {
    const uint32_t key = candidate_keys[c];
    const unsigned long long index = static_cast<unsigned long long>(candidate_indices[c]);
    if (key > threshold_key || (key == threshold_key && index <= cutoff)) mask[index] = 1;
  }
}

// ---- ascending indices from the mask --------------------------------------------------------------
// Each thread owns 16 consecutive mask bytes of a 4096-byte tile (one 16-byte load when aligned). The
// mask bytes are 0 or 1, so popcount of a word counts its selected bytes.
struct MaskBytes {
  uint32_t word[4];
};

__device__ __forceinline__ MaskBytes load_mask_bytes(const uint8_t *__restrict__ mask, int64_t begin, int64_t end,
                                                     bool aligned) {
  MaskBytes bytes{{0u, 0u, 0u, 0u}};
  if (aligned && begin + kTileBytesPerThread <= end) {
    const uint4 v = *reinterpret_cast<const uint4 *>(mask + begin);
    bytes.word[0] = v.x;
    bytes.word[1] = v.y;
    bytes.word[2] = v.z;
    bytes.word[3] = v.w;
  } else {
    for (int b = 0; b < kTileBytesPerThread && begin + b < end; ++b) {
      bytes.word[b >> 2] |= static_cast<uint32_t>(mask[begin + b] != 0) << (8 * (b & 3));
    }
  }
  return bytes;
}

__device__ __forceinline__ unsigned count_bytes(const MaskBytes &bytes) {
  return __popc(bytes.word[0]) + __popc(bytes.word[1]) + __popc(bytes.word[2]) + __popc(bytes.word[3]);
}

__global__ void __launch_bounds__(kThreads) tile_count_kernel(const uint8_t *__restrict__ mask, int64_t n,
                                                              int64_t tiles, int aligned,
                                                              unsigned long long *__restrict__ tile_counts) {
  __shared__ unsigned warp_sums[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t begin = tile * kTile + static_cast<int64_t>(threadIdx.x) * kTileBytesPerThread;
    const int64_t end = min(n, (tile + 1) * kTile);
    unsigned count = count_bytes(load_mask_bytes(mask, begin, end, aligned != 0));
    for (int offset = 16; offset > 0; offset >>= 1) count += __shfl_down_sync(kFullWarp, count, offset);
    if (lane == 0) warp_sums[warp] = count;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned total = 0;
      for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
      tile_counts[tile] = total;
    }
    __syncthreads();  // warp_sums is rewritten by the next tile
  }
}

// One block: exclusive scan of tile_counts[0, tiles) in place. Each thread sums a run of consecutive
// tiles (about 24 at n = 1e8), the block scans the 1024 sums, and each thread writes its run: one block
// pass instead of one per 1024 tiles.
__global__ void scan_kernel(unsigned long long *tile_counts, int64_t tiles) {
  __shared__ unsigned long long warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int64_t per_thread = (tiles + blockDim.x - 1) / blockDim.x;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * per_thread;
  const int64_t last = min(tiles, first + per_thread);
  unsigned long long sum = 0;
  for (int64_t t = first; t < last; ++t) sum += tile_counts[t];
  unsigned long long inclusive = sum;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned long long other = __shfl_up_sync(kFullWarp, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    unsigned long long w = lane < warps ? warp_sums[lane] : 0ull;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const unsigned long long other = __shfl_up_sync(kFullWarp, w, offset);
      if (lane >= offset) w += other;
    }
    if (lane < warps) warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  unsigned long long before = (warp > 0 ? warp_sums[warp - 1] : 0ull) + inclusive - sum;
  for (int64_t t = first; t < last; ++t) {
    const unsigned long long count = tile_counts[t];
    tile_counts[t] = before;
    before += count;
  }
}

// One block step per tile: a block scan of the per-thread counts gives each thread where its indices go.
__global__ void __launch_bounds__(kThreads) tile_write_kernel(const uint8_t *__restrict__ mask, int64_t n,
                                                              int64_t tiles, int aligned,
                                                              const unsigned long long *__restrict__ tile_offsets,
                                                              int64_t k, int64_t *__restrict__ indices) {
  __shared__ unsigned warp_totals[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t begin = tile * kTile + static_cast<int64_t>(threadIdx.x) * kTileBytesPerThread;
    const int64_t end = min(n, (tile + 1) * kTile);
    const MaskBytes bytes = load_mask_bytes(mask, begin, end, aligned != 0);
    const unsigned count = count_bytes(bytes);
    unsigned inclusive = count;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const unsigned other = __shfl_up_sync(kFullWarp, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    unsigned before = inclusive - count;
    for (int w = 0; w < warp; ++w) before += warp_totals[w];
    unsigned long long position = tile_offsets[tile] + before;
#pragma unroll
    for (int b = 0; b < kTileBytesPerThread; ++b) {
      if ((bytes.word[b >> 2] >> (8 * (b & 3))) & 1u) {
        if (position < static_cast<unsigned long long>(k)) indices[position] = begin + b;
        ++position;
      }
    }
    __syncthreads();  // warp_totals is rewritten by the next tile
  }
}

__global__ void digit_histogram_kernel(const float *__restrict__ scores, int64_t n, uint32_t prefix,
                                       int prefix_bits, int digit_bits, int use_shared,
                                       unsigned long long *__restrict__ out) {
  extern __shared__ uint32_t shared_counts[];
  const int buckets = 1 << digit_bits;
  if (use_shared) {
    for (int d = threadIdx.x; d < buckets; d += blockDim.x) shared_counts[d] = 0u;
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t key = float_key(scores[i]);
    if (prefix_bits != 0 && (key >> (32 - prefix_bits)) != prefix) continue;
    const uint32_t digit = (key << prefix_bits) >> (32 - digit_bits);
    if (use_shared) {
      atomicAdd(&shared_counts[digit], 1u);
    } else {
      atomicAdd(&out[digit], 1ull);
    }
  }
  if (use_shared) {
    __syncthreads();
    for (int d = threadIdx.x; d < buckets; d += blockDim.x) {
      if (shared_counts[d] != 0u) atomicAdd(&out[d], static_cast<unsigned long long>(shared_counts[d]));
    }
  }
}

#define AQL_CHECK_LAUNCH(function, what)                                                             \
  do {                                                                                               \
    const cudaError_t error_ = cudaGetLastError();                                                   \
    if (error_ != cudaSuccess) {                                                                     \
      return aql::fail(AQL_ERR_CUDA, "%s: %s failed: %s", function, what, cudaGetErrorString(error_)); \
    }                                                                                                \
  } while (0)

#define AQL_CHECK_CUDA(function, call)                                                               \
  do {                                                                                               \
    const cudaError_t error_ = (call);                                                               \
    if (error_ != cudaSuccess) {                                                                     \
      return aql::fail(AQL_ERR_CUDA, "%s: %s failed: %s", function, #call, cudaGetErrorString(error_)); \
    }                                                                                                \
  } while (0)

// Blocks for a grid-stride kernel: one wave (as many as the SMs hold at once; a second wave of a
// grid-stride loop would start only when the first ends, leaving SMs idle for its duration), never more
// than the work can use, at least `floor_blocks`.
template <class Kernel>
aql_status one_wave(const char *function, Kernel kernel, int64_t useful_blocks, int64_t floor_blocks, int *blocks) {
  int device = 0, sms = 0, per_sm = 0;
  AQL_CHECK_CUDA(function, cudaGetDevice(&device));
  AQL_CHECK_CUDA(function, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  AQL_CHECK_CUDA(function, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t wave = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  int64_t grid = useful_blocks < wave ? useful_blocks : wave;
  if (grid < floor_blocks) grid = floor_blocks;
  if (grid < 1) grid = 1;
  if (grid > 0x7fffffff) grid = 0x7fffffff;
  *blocks = static_cast<int>(grid);
  return AQL_OK;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int VEC, class Index>
aql_status select_with(const char *fn, const float *scores, int64_t n, int64_t k, uint8_t *selected,
                       int64_t *indices, float *threshold, const Layout &layout, char *base, cudaStream_t stream) {
  SelectState *state = reinterpret_cast<SelectState *>(base + layout.state);
  unsigned long long *hist = reinterpret_cast<unsigned long long *>(base + layout.hist);
  unsigned long long *tile_counts = reinterpret_cast<unsigned long long *>(base + layout.tile_counts);
  uint32_t *candidate_keys = reinterpret_cast<uint32_t *>(base + layout.candidate_keys);
  Index *candidate_indices = reinterpret_cast<Index *>(base + layout.candidate_indices);

  const int64_t items = n / VEC;
  const int64_t counter_floor = n / (int64_t{1} << 31) + 1;  // uint32 shared counters per block
  int compact_blocks = 0, histogram_blocks = 0, candidate_blocks = 0, scatter_blocks = 0;
  aql_status status = one_wave(fn, compact_kernel<VEC, Index>, ceil_div(items, int64_t{kThreads} * kUnroll), 1, &compact_blocks);
  if (status != AQL_OK) return status;
  status = one_wave(fn, histogram_scores_kernel<VEC>, ceil_div(items, kThreads), counter_floor, &histogram_blocks);
  if (status != AQL_OK) return status;
  // The candidate count is on the device: sized for the worst case, n.
  status = one_wave(fn, refine_kernel<Index>, ceil_div(n, kThreads), counter_floor, &candidate_blocks);
  if (status != AQL_OK) return status;
  status = one_wave(fn, scatter_kernel<Index>, ceil_div(n, kThreads), 1, &scatter_blocks);
  if (status != AQL_OK) return status;

  init_kernel<<<1, kThreads, 0, stream>>>(state, hist, k);
  AQL_CHECK_LAUNCH(fn, "init_kernel");
  const int64_t samples = n < kSample ? n : kSample;
  int64_t rank_high = 0, rank_low = 0;
  sample_ranks(n, k, samples, &rank_high, &rank_low);
  const int sample_blocks = static_cast<int>(ceil_div(samples, int64_t{kThreads} * kSamplesPerThread));  // 64 at most
  sample_kernel<<<sample_blocks, kThreads, 0, stream>>>(scores, n, samples, rank_high, rank_low, state, hist);
  AQL_CHECK_LAUNCH(fn, "sample_kernel");
  sample_refine_kernel<<<sample_blocks, kThreads, 0, stream>>>(scores, n, samples, rank_high, rank_low, state, hist);
  AQL_CHECK_LAUNCH(fn, "sample_refine_kernel");
  compact_kernel<VEC, Index><<<compact_blocks, kThreads, 0, stream>>>(scores, n, selected, state, candidate_keys,
                                                                        candidate_indices, 0, k);
  AQL_CHECK_LAUNCH(fn, "compact_kernel");
  // After a miss only (both return at once otherwise): the exact top digit, then the mask again.
  histogram_scores_kernel<VEC><<<histogram_blocks, kThreads, 0, stream>>>(scores, n, state, hist);
  AQL_CHECK_LAUNCH(fn, "histogram_scores_kernel");
  compact_kernel<VEC, Index><<<compact_blocks, kThreads, 0, stream>>>(scores, n, selected, state, candidate_keys,
                                                                        candidate_indices, 1, k);
  AQL_CHECK_LAUNCH(fn, "compact_kernel");

  // The key over the candidates: 12 bits (skipped when the range was one digit), then 10 + 10.
  for (int prefix_bits = 0; prefix_bits < 32;) {
    const int bits = prefix_bits == 0 ? kFirstBits : kRefineBits;
    const int shift = 32 - prefix_bits - bits;
    refine_kernel<Index><<<candidate_blocks, kThreads, 0, stream>>>(candidate_keys, candidate_indices, state, 0, shift,
                                                                    bits, hist);
    AQL_CHECK_LAUNCH(fn, "refine_kernel");
    prefix_bits += bits;
  }
  // Index digits of the threshold-equal candidates (the kernels return at once when all are taken).
  const int width = index_bits(n);
  for (int done = 0; done < width;) {
    const int bits = width - done < kRefineBits ? width - done : kRefineBits;
    const int shift = width - done - bits;
    refine_kernel<Index><<<candidate_blocks, kThreads, 0, stream>>>(candidate_keys, candidate_indices, state, 1, shift,
                                                                    bits, hist);
    AQL_CHECK_LAUNCH(fn, "refine_kernel");
    done += bits;
  }
  scatter_kernel<Index><<<scatter_blocks, kThreads, 0, stream>>>(candidate_keys, candidate_indices, state, selected,
                                                                 threshold);
  AQL_CHECK_LAUNCH(fn, "scatter_kernel");

  if (indices != nullptr) {
    const int64_t tiles = ceil_div(n, kTile);
    const int aligned = reinterpret_cast<uintptr_t>(selected) % 16 == 0 ? 1 : 0;
    int count_blocks = 0, write_blocks = 0;
    status = one_wave(fn, tile_count_kernel, tiles, 1, &count_blocks);
    if (status != AQL_OK) return status;
    status = one_wave(fn, tile_write_kernel, tiles, 1, &write_blocks);
    if (status != AQL_OK) return status;
    tile_count_kernel<<<count_blocks, kThreads, 0, stream>>>(selected, n, tiles, aligned, tile_counts);
    AQL_CHECK_LAUNCH(fn, "tile_count_kernel");
    scan_kernel<<<1, 1024, 0, stream>>>(tile_counts, tiles);
    AQL_CHECK_LAUNCH(fn, "scan_kernel");
    tile_write_kernel<<<write_blocks, kThreads, 0, stream>>>(selected, n, tiles, aligned, tile_counts, k, indices);
    AQL_CHECK_LAUNCH(fn, "tile_write_kernel");
  }
  return aql::ok();
}

aql_status topk_select(const float *scores, int64_t n, int64_t k, uint8_t *mask, int64_t *indices,
                       float *threshold, void *workspace, cudaStream_t stream) {
  const char *fn = "aql_cuda_topk_select";
  if (k == 0) {
    if (mask != nullptr && n > 0) AQL_CHECK_CUDA(fn, cudaMemsetAsync(mask, 0, static_cast<size_t>(n), stream));
    if (threshold != nullptr) {
      write_value_kernel<<<1, 1, 0, stream>>>(threshold, std::numeric_limits<float>::infinity());
      AQL_CHECK_LAUNCH(fn, "write_value_kernel");
    }
    return aql::ok();
  }
  const Layout layout = layout_for(n);
  char *base = static_cast<char *>(workspace);
  uint8_t *selected = mask;  // indices are compacted from a mask: the caller's, or a scratch one
  if (selected == nullptr && indices != nullptr) selected = reinterpret_cast<uint8_t *>(base + layout.scratch_mask);
  const bool vectorised = reinterpret_cast<uintptr_t>(scores) % 16 == 0 &&
                          (selected == nullptr || reinterpret_cast<uintptr_t>(selected) % 4 == 0);
  // Candidate indices as uint32 while they fit: 8 instead of 12 bytes per candidate written and read.
  const bool narrow = n <= (int64_t{1} << 32);
  if (vectorised) {
    return narrow ? select_with<4, uint32_t>(fn, scores, n, k, selected, indices, threshold, layout, base, stream)
                  : select_with<4, int64_t>(fn, scores, n, k, selected, indices, threshold, layout, base, stream);
  }
  return narrow ? select_with<1, uint32_t>(fn, scores, n, k, selected, indices, threshold, layout, base, stream)
                : select_with<1, int64_t>(fn, scores, n, k, selected, indices, threshold, layout, base, stream);
}

}  // namespace

extern "C" {

AQL_API aql_status aql_cuda_topk_workspace_size(int64_t n, int64_t k, size_t *bytes) {
  if (n < 0) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_cuda_topk_workspace_size: n must be >= 0, got %lld", static_cast<long long>(n));
  if (k < 0 || k > n) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_cuda_topk_workspace_size: k must be in [0, %lld], got %lld",
                     static_cast<long long>(n), static_cast<long long>(k));
  }
  if (bytes == nullptr) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "aql_cuda_topk_workspace_size: bytes is NULL");
  *bytes = layout_for(n).total;
  return aql::ok();
}

AQL_API aql_status aql_cuda_topk_select(const float *scores, int64_t n, int64_t k, uint8_t *mask,
                                        int64_t *indices, float *threshold, void *workspace,
                                        size_t workspace_bytes, void *stream) {
  const char *fn = "aql_cuda_topk_select";
  if (n < 0) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "%s: n must be >= 0, got %lld", fn, static_cast<long long>(n));
  if (k < 0 || k > n) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "%s: k must be in [0, %lld], got %lld", fn,
                     static_cast<long long>(n), static_cast<long long>(k));
  }
  if (scores == nullptr && n > 0) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "%s: scores is NULL", fn);
  if (k > 0) {
    const size_t needed = layout_for(n).total;
    if (workspace == nullptr || workspace_bytes < needed) {
      return aql::fail(AQL_ERR_WORKSPACE_TOO_SMALL, "%s: workspace of %zu bytes, needs %zu (aql_cuda_topk_workspace_size)",
                       fn, workspace_bytes, needed);
    }
    if (reinterpret_cast<uintptr_t>(workspace) % kAlign != 0) {
      return aql::fail(AQL_ERR_INVALID_ARGUMENT, "%s: workspace must be %zu-byte aligned", fn, kAlign);
    }
  }
  return topk_select(scores, n, k, mask, indices, threshold, workspace, static_cast<cudaStream_t>(stream));
}

AQL_API aql_status aql_cuda_digit_histogram(const float *scores, int64_t n, uint32_t prefix,
                                            int32_t prefix_bits, int32_t digit_bits, int64_t *out,
                                            void *stream) {
  const char *fn = "aql_cuda_digit_histogram";
  if (n < 0) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "%s: n must be >= 0, got %lld", fn, static_cast<long long>(n));
  if (digit_bits < 1 || digit_bits > 16) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "%s: digit_bits must be in [1, 16], got %d", fn, digit_bits);
  }
  if (prefix_bits < 0 || prefix_bits + digit_bits > 32) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "%s: prefix_bits must be in [0, %d] (prefix_bits + digit_bits <= 32), got %d",
                     fn, 32 - digit_bits, prefix_bits);
  }
  if ((static_cast<uint64_t>(prefix) >> prefix_bits) != 0) {
    return aql::fail(AQL_ERR_INVALID_ARGUMENT, "%s: prefix must be < 2^%d, got %u", fn, prefix_bits, prefix);
  }
  if ((scores == nullptr && n > 0) || out == nullptr) return aql::fail(AQL_ERR_INVALID_ARGUMENT, "%s: scores or out is NULL", fn);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  AQL_CHECK_CUDA(fn, cudaMemsetAsync(out, 0, sizeof(int64_t) << digit_bits, s));
  if (n == 0) return aql::ok();
  int blocks = 0;
  const aql_status status = one_wave(fn, digit_histogram_kernel, ceil_div(n, kThreads), n / (int64_t{1} << 31) + 1, &blocks);
  if (status != AQL_OK) return status;
  const int use_shared = digit_bits <= 13 ? 1 : 0;  // 32 KiB of uint32 counters at most
  const size_t shared_bytes = use_shared ? sizeof(uint32_t) << digit_bits : 0;
  digit_histogram_kernel<<<blocks, kThreads, shared_bytes, s>>>(scores, n, prefix, prefix_bits, digit_bits, use_shared,
                                                               reinterpret_cast<unsigned long long *>(out));
  AQL_CHECK_LAUNCH(fn, "digit_histogram_kernel");
  return aql::ok();
}

}  // extern "C"
