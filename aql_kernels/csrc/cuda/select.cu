// Exact top-k selection on the GPU: radix select over order-preserving keys, with no host
// synchronisation. csrc/cpu/select.cpp runs the same phases on the CPU (and is what CI tests).
//
// Order: scores become uint32 keys (NaN -> 0, below -inf; -0.0 -> the key of +0.0); the selected set
// is the first k of a stable descending sort, i.e. the k largest composites (key, -index). Radix
// select over that composite, most significant digit first (the GPU radix select of Alabi et al.,
// "Fast k-selection algorithms for GPUs", ACM JEA 2012; the stable tie-break by index digits is
// ours). Phases, all on the caller's stream:
//   histogram_scores_kernel   12-bit digit histogram of every key: per-block shared-memory counters
//                             merged into 64-bit global ones                      (read 1 of scores)
//   pick_bucket_kernel        one warp: the bucket holding the k-th largest key and its rank in it
//   compact_kernel            mask = digit > bucket for every score, and the boundary bucket's keys
//                             and indices appended to a candidate list (one atomic per block step)
//                                                                   (read 2 of scores, mask write)
//   histogram_candidates_kernel + pick_bucket_kernel, twice: 10 + 10 more key bits over the
//                             candidates only -> the exact k-th key T and the number t of T-equal
//                             elements that the first k take
//   the same over index digits of the T-equal candidates, only when t is less than their number
//                             (the kernels read that flag and return at once otherwise): the t-th
//                             smallest index among them, the cutoff
//   scatter_kernel            candidates with key > T, or key == T and index <= cutoff, set in mask
//   tile_count / scan / tile_write, only for indices: per-tile counts of the mask, exclusive scan,
//                             and a block-level ballot scan that writes the indices in ascending order
// Traffic for the mask: two reads of the scores (8 bytes per element) and one write of the mask
// (1 byte), plus 12 bytes per candidate for the compaction and 4-12 bytes per candidate and pass for
// the refinement; candidates are the boundary bucket of the 12-bit digit (n / 4096 for spread-out
// scores, up to n for adversarial ones: all scores equal). Indices add two reads of the mask (2 bytes
// per element) and the 8k-byte write. Every data-dependent size (the candidate count, the flags) lives
// in device memory: kernels are launched for the worst case and grid-stride over what they read.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "../common.h"

namespace {

constexpr int kFirstBits = 12;  // 16 KiB of shared uint32 counters per block
constexpr int kFirstBuckets = 1 << kFirstBits;
constexpr int kRefineBits = 10;
constexpr int kThreads = 256;
constexpr int kTile = 4096;  // elements of the mask per block-level step of the index write
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr size_t kAlign = 256;

struct SelectState {
  unsigned long long remaining;        // rank (1-based) of the wanted element in the current bucket
  unsigned long long bucket_count;     // elements in the last bucket picked
  unsigned long long candidate_count;  // boundary-bucket elements compacted
  unsigned long long equal_count;      // elements whose key is the threshold key
  unsigned long long index_prefix;     // digits of the cutoff index found so far
  long long cutoff;                    // last index taken among threshold-equal elements
  unsigned int key_prefix;             // digits of the threshold key found so far
  unsigned int need_index;             // 1 when only some threshold-equal elements are taken
};

enum PickMode { kPickFirstKey = 0, kPickKey = 1, kPickLastKey = 2, kPickIndex = 3 };

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

// Order-preserving key, branch-free (same expression as the CPU twin).
__device__ __forceinline__ uint32_t float_key(float value) {
  const uint32_t bits = __float_as_uint(value);
  const uint32_t magnitude = bits & 0x7fffffffu;
  const uint32_t canonical = bits & (0u - static_cast<uint32_t>(magnitude != 0u));  // -0.0 -> +0.0
  const uint32_t key = canonical ^ (static_cast<uint32_t>(static_cast<int32_t>(canonical) >> 31) | 0x80000000u);
  return key & (0u - static_cast<uint32_t>(magnitude <= 0x7f800000u));  // NaN -> 0
}

__device__ __forceinline__ float key_to_float(uint32_t key) {
  uint32_t bits;
  if (key == 0u) {
    bits = 0x7fc00000u;
  } else if (key & 0x80000000u) {
    bits = key ^ 0x80000000u;
  } else {
    bits = ~key;
  }
  return __uint_as_float(bits);
}

// Scores as items of VEC consecutive floats (float4 loads when the pointer allows).
template <int VEC>
__device__ __forceinline__ void load_keys(const float *__restrict__ scores, int64_t item, uint32_t (&keys)[VEC]) {
  if constexpr (VEC == 4) {
    const float4 q = reinterpret_cast<const float4 *>(scores)[item];
    keys[0] = float_key(q.x);
    keys[1] = float_key(q.y);
    keys[2] = float_key(q.z);
    keys[3] = float_key(q.w);
  } else {
    keys[0] = float_key(scores[item]);
  }
}

// ---- histogram of the top digit -------------------------------------------------------------------
template <int VEC>
__global__ void histogram_scores_kernel(const float *__restrict__ scores, int64_t n,
                                        unsigned long long *__restrict__ hist) {
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
  __syncthreads();
  for (int d = threadIdx.x; d < kFirstBuckets; d += blockDim.x) {
    if (counts[d] != 0u) atomicAdd(&hist[d], static_cast<unsigned long long>(counts[d]));
  }
}

// ---- bucket picking (one warp) --------------------------------------------------------------------
// Finds the bucket holding the state->remaining-th element, walking from the top bucket down (key
// digits) or from bucket 0 up (index digits), and folds the digit into the prefix.
__global__ void pick_bucket_kernel(const unsigned long long *__restrict__ hist, int bits, int mode,
                                   SelectState *state) {
  if (mode == kPickIndex && state->need_index == 0u) return;
  // Every lane reads the rank before any lane updates the state (the winning lane writes it below).
  const unsigned long long remaining = state->remaining;
  __syncwarp();
  const int buckets = 1 << bits;
  const bool descending = mode != kPickIndex;
  const int lane = threadIdx.x;
  const int per_lane = (buckets + 31) / 32;
  const int first = lane * per_lane;
  const int last = min(buckets, first + per_lane);
  unsigned long long sum = 0;
  for (int p = first; p < last; ++p) sum += hist[descending ? buckets - 1 - p : p];
  unsigned long long inclusive = sum;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned long long other = __shfl_up_sync(kFullWarp, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  unsigned long long before = inclusive - sum;
  if (!(before < remaining && remaining <= inclusive)) return;  // exactly one lane holds it
  for (int p = first; p < last; ++p) {
    const int digit = descending ? buckets - 1 - p : p;
    const unsigned long long count = hist[digit];
    if (before + count >= remaining) {
      state->remaining = remaining - before;
      state->bucket_count = count;
      if (mode == kPickIndex) {
        state->index_prefix = (state->index_prefix << bits) | static_cast<unsigned long long>(digit);
      } else {
        state->key_prefix = mode == kPickFirstKey ? static_cast<uint32_t>(digit)
                                                  : (state->key_prefix << bits) | static_cast<uint32_t>(digit);
      }
      if (mode == kPickLastKey) {
        state->equal_count = count;
        state->need_index = (remaining - before) < count ? 1u : 0u;
      }
      return;
    }
    before += count;
  }
}

// ---- mask of the buckets above, compaction of the boundary bucket ----------------------------------
// Candidate slots are reserved once per block and iteration (a block-wide scan of the per-thread
// counts, then one atomicAdd by thread 0): all blocks reserve from the same counter, and one atomic
// per warp would put ~800k same-address atomics on it at n = 1e8.
template <int VEC>
__global__ void compact_kernel(const float *__restrict__ scores, int64_t n, uint8_t *__restrict__ mask,
                               SelectState *state, uint32_t *__restrict__ candidate_keys,
                               int64_t *__restrict__ candidate_indices) {
  __shared__ unsigned warp_offsets[kThreads / 32];
  __shared__ unsigned long long block_base;
  const uint32_t boundary = state->key_prefix;
  unsigned long long *counter = &state->candidate_count;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int64_t items = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Block-uniform trip count: every thread runs every iteration (there are __syncthreads inside).
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < items; base += stride) {
    const int64_t item = base + threadIdx.x;
    uint32_t keys[VEC] = {};
    unsigned flags = 0u, count = 0u;
    if (item < items) {
      load_keys<VEC>(scores, item, keys);
      uint8_t above[VEC];
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        const uint32_t digit = keys[q] >> (32 - kFirstBits);
        above[q] = digit > boundary ? 1 : 0;
        if (digit == boundary) {
          flags |= 1u << q;
          ++count;
        }
      }
      if (mask != nullptr) {
        if constexpr (VEC == 4) {
          reinterpret_cast<uchar4 *>(mask)[item] = make_uchar4(above[0], above[1], above[2], above[3]);
        } else {
          mask[item] = above[0];
        }
      }
    }
    unsigned inclusive = count;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const unsigned other = __shfl_up_sync(kFullWarp, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_offsets[warp] = inclusive;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned total = 0;
      for (int w = 0; w < warps; ++w) {
        const unsigned c = warp_offsets[w];
        warp_offsets[w] = total;
        total += c;
      }
      block_base = total != 0u ? atomicAdd(counter, static_cast<unsigned long long>(total)) : 0ull;
    }
    __syncthreads();
    if (flags != 0u) {
      unsigned long long position = block_base + warp_offsets[warp] + (inclusive - count);
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        if (flags & (1u << q)) {
          candidate_keys[position] = keys[q];
          candidate_indices[position] = item * VEC + q;
          ++position;
        }
      }
    }
    __syncthreads();  // warp_offsets and block_base are rewritten by the next iteration
  }
  if (VEC > 1 && blockIdx.x == 0) {  // the n % VEC last scores (at most 3): one atomic each
    const int64_t i = items * VEC + threadIdx.x;
    if (i < n) {
      const uint32_t key = float_key(scores[i]);
      const uint32_t digit = key >> (32 - kFirstBits);
      if (mask != nullptr) mask[i] = digit > boundary ? 1 : 0;
      if (digit == boundary) {
        const unsigned long long position = atomicAdd(counter, 1ull);
        candidate_keys[position] = key;
        candidate_indices[position] = i;
      }
    }
  }
}

// ---- refinement over the candidates -------------------------------------------------------------
// Histogram of the digit at `shift` (width `bits`) over the candidates that match the prefix found so
// far: of the key (index_pass == 0) or, among threshold-equal candidates, of the index.
__global__ void histogram_candidates_kernel(const uint32_t *__restrict__ candidate_keys,
                                            const int64_t *__restrict__ candidate_indices,
                                            const SelectState *state, int index_pass, int shift, int bits,
                                            unsigned long long *__restrict__ hist) {
  if (index_pass && state->need_index == 0u) return;
  __shared__ uint32_t counts[1 << kRefineBits];
  const int buckets = 1 << bits;
  for (int d = threadIdx.x; d < buckets; d += blockDim.x) counts[d] = 0u;
  __syncthreads();
  const int64_t count = static_cast<int64_t>(state->candidate_count);
  const uint32_t key_prefix = state->key_prefix;
  const unsigned long long index_prefix = state->index_prefix;
  const uint32_t digit_mask = static_cast<uint32_t>(buckets - 1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < count; c += stride) {
    const uint32_t key = candidate_keys[c];
    if (!index_pass) {
      if ((key >> (shift + bits)) == key_prefix) atomicAdd(&counts[(key >> shift) & digit_mask], 1u);
    } else if (key == key_prefix) {
      const unsigned long long index = static_cast<unsigned long long>(candidate_indices[c]);
      if ((index >> (shift + bits)) == index_prefix) {
        atomicAdd(&counts[static_cast<uint32_t>(index >> shift) & digit_mask], 1u);
      }
    }
  }
  __syncthreads();
  for (int d = threadIdx.x; d < buckets; d += blockDim.x) {
    if (counts[d] != 0u) atomicAdd(&hist[d], static_cast<unsigned long long>(counts[d]));
  }
}

// One thread: the cutoff index and the threshold value.
__global__ void finalize_kernel(SelectState *state, float *threshold) {
  state->cutoff = state->need_index ? static_cast<long long>(state->index_prefix) : 0x7fffffffffffffffLL;
  if (threshold != nullptr) *threshold = key_to_float(state->key_prefix);
}

__global__ void scatter_kernel(const uint32_t *__restrict__ candidate_keys,
                               const int64_t *__restrict__ candidate_indices, const SelectState *state,
                               uint8_t *__restrict__ mask) {
  const int64_t count = static_cast<int64_t>(state->candidate_count);
  const uint32_t threshold_key = state->key_prefix;
  const long long cutoff = state->cutoff;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < count; c += stride) {
    const uint32_t key = candidate_keys[c];
    const int64_t index = candidate_indices[c];
    mask[index] = (key > threshold_key || (key == threshold_key && index <= cutoff)) ? 1 : 0;
  }
}

__global__ void init_state_kernel(SelectState *state, int64_t k) {
  state->remaining = static_cast<unsigned long long>(k);
  state->bucket_count = 0;
  state->candidate_count = 0;
  state->equal_count = 0;
  state->index_prefix = 0;
  state->cutoff = 0;
  state->key_prefix = 0;
  state->need_index = 0;
}

__global__ void write_value_kernel(float *out, float value) { *out = value; }

// ---- ascending indices from the mask --------------------------------------------------------------
__device__ __forceinline__ unsigned long long block_sum(unsigned long long value, unsigned long long *shared) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(kFullWarp, value, offset);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  unsigned long long total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += shared[w];
  }
  __syncthreads();
  return total;  // valid in thread 0
}

__global__ void tile_count_kernel(const uint8_t *__restrict__ mask, int64_t n, int64_t tiles,
                                  unsigned long long *__restrict__ tile_counts) {
  __shared__ unsigned long long warp_sums[kThreads / 32];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t begin = tile * kTile;
    const int64_t end = min(n, begin + kTile);
    unsigned long long count = 0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) count += mask[i] != 0;
    const unsigned long long total = block_sum(count, warp_sums);
    if (threadIdx.x == 0) tile_counts[tile] = total;
  }
}

// One block: exclusive scan of tile_counts[0, tiles) in place.
__global__ void scan_kernel(unsigned long long *tile_counts, int64_t tiles) {
  __shared__ unsigned long long warp_sums[32];
  __shared__ unsigned long long carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  for (int64_t base = 0; base < tiles; base += blockDim.x) {
    const int64_t t = base + threadIdx.x;
    const unsigned long long value = t < tiles ? tile_counts[t] : 0ull;
    unsigned long long inclusive = value;
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
    const unsigned long long before = carry + (warp > 0 ? warp_sums[warp - 1] : 0ull) + inclusive - value;
    if (t < tiles) tile_counts[t] = before;
    __syncthreads();
    if (threadIdx.x == 0) carry += warp_sums[warps - 1];
    __syncthreads();
  }
}

__global__ void tile_write_kernel(const uint8_t *__restrict__ mask, int64_t n, int64_t tiles,
                                  const unsigned long long *__restrict__ tile_offsets, int64_t k,
                                  int64_t *__restrict__ indices) {
  __shared__ unsigned warp_counts[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    unsigned long long offset = tile_offsets[tile];
    const int64_t begin = tile * kTile;
    const int64_t end = min(n, begin + kTile);
    for (int64_t chunk = begin; chunk < end; chunk += blockDim.x) {  // block-uniform trip count
      const int64_t i = chunk + threadIdx.x;
      const bool take = i < end && mask[i] != 0;
      const unsigned ballot = __ballot_sync(kFullWarp, take);
      if (lane == 0) warp_counts[warp] = __popc(ballot);
      __syncthreads();
      unsigned before = 0, total = 0;
      for (int w = 0; w < warps; ++w) {
        const unsigned c = warp_counts[w];
        before += w < warp ? c : 0u;
        total += c;
      }
      if (take) {
        const unsigned long long position = offset + before + __popc(ballot & ((1u << lane) - 1u));
        if (position < static_cast<unsigned long long>(k)) indices[position] = i;
      }
      offset += total;
      __syncthreads();  // warp_counts is rewritten by the next chunk
    }
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

// Blocks for a grid-stride pass over `work` items: enough to fill the device (8 blocks of kThreads
// per SM), never more than the work needs, and enough that no block counts more than 2^31 scores in
// its uint32 shared counters (work is in items of up to 4 scores).
aql_status grid_for(const char *function, int64_t work, int *blocks) {
  int device = 0, sms = 0;
  AQL_CHECK_CUDA(function, cudaGetDevice(&device));
  AQL_CHECK_CUDA(function, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (work + kThreads - 1) / kThreads;
  int64_t grid = needed < static_cast<int64_t>(sms) * 8 ? needed : static_cast<int64_t>(sms) * 8;
  const int64_t floor_blocks = work / (int64_t{1} << 29) + 1;
  if (grid < floor_blocks) grid = floor_blocks;
  if (grid < 1) grid = 1;
  if (grid > 0x7fffffff) grid = 0x7fffffff;
  *blocks = static_cast<int>(grid);
  return AQL_OK;
}

int index_bits(int64_t n) {
  int bits = 1;
  while (bits < 63 && (static_cast<uint64_t>(n - 1) >> bits) != 0) ++bits;
  return bits;
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
  SelectState *state = reinterpret_cast<SelectState *>(base + layout.state);
  unsigned long long *hist = reinterpret_cast<unsigned long long *>(base + layout.hist);
  unsigned long long *tile_counts = reinterpret_cast<unsigned long long *>(base + layout.tile_counts);
  uint32_t *candidate_keys = reinterpret_cast<uint32_t *>(base + layout.candidate_keys);
  int64_t *candidate_indices = reinterpret_cast<int64_t *>(base + layout.candidate_indices);
  uint8_t *selected = mask;
  if (selected == nullptr && indices != nullptr) selected = reinterpret_cast<uint8_t *>(base + layout.scratch_mask);

  const bool vectorised = reinterpret_cast<uintptr_t>(scores) % 16 == 0 &&
                          (selected == nullptr || reinterpret_cast<uintptr_t>(selected) % 4 == 0);
  int blocks = 0;
  aql_status status = grid_for(fn, vectorised ? (n + 3) / 4 : n, &blocks);
  if (status != AQL_OK) return status;
  int candidate_blocks = 0;  // the candidate count is on the device: sized for the worst case, n
  status = grid_for(fn, n, &candidate_blocks);
  if (status != AQL_OK) return status;

  init_state_kernel<<<1, 1, 0, stream>>>(state, k);
  AQL_CHECK_LAUNCH(fn, "init_state_kernel");
  const size_t first_hist_bytes = sizeof(unsigned long long) * kFirstBuckets;
  AQL_CHECK_CUDA(fn, cudaMemsetAsync(hist, 0, first_hist_bytes, stream));

  // Top digit over every score, then the mask and the candidates.
  if (vectorised) {
    histogram_scores_kernel<4><<<blocks, kThreads, 0, stream>>>(scores, n, hist);
  } else {
    histogram_scores_kernel<1><<<blocks, kThreads, 0, stream>>>(scores, n, hist);
  }
  AQL_CHECK_LAUNCH(fn, "histogram_scores_kernel");
  pick_bucket_kernel<<<1, 32, 0, stream>>>(hist, kFirstBits, kPickFirstKey, state);
  AQL_CHECK_LAUNCH(fn, "pick_bucket_kernel");
  if (vectorised) {
    compact_kernel<4><<<blocks, kThreads, 0, stream>>>(scores, n, selected, state, candidate_keys, candidate_indices);
  } else {
    compact_kernel<1><<<blocks, kThreads, 0, stream>>>(scores, n, selected, state, candidate_keys, candidate_indices);
  }
  AQL_CHECK_LAUNCH(fn, "compact_kernel");

  // The rest of the key over the candidates.
  for (int prefix_bits = kFirstBits; prefix_bits < 32;) {
    const int bits = 32 - prefix_bits < kRefineBits ? 32 - prefix_bits : kRefineBits;
    const int shift = 32 - prefix_bits - bits;
    AQL_CHECK_CUDA(fn, cudaMemsetAsync(hist, 0, sizeof(unsigned long long) << bits, stream));
    histogram_candidates_kernel<<<candidate_blocks, kThreads, 0, stream>>>(candidate_keys, candidate_indices,
                                                                          state, 0, shift, bits, hist);
    AQL_CHECK_LAUNCH(fn, "histogram_candidates_kernel");
    prefix_bits += bits;
    pick_bucket_kernel<<<1, 32, 0, stream>>>(hist, bits, prefix_bits == 32 ? kPickLastKey : kPickKey, state);
    AQL_CHECK_LAUNCH(fn, "pick_bucket_kernel");
  }
  // Index digits of the threshold-equal candidates (the kernels return at once when all are taken).
  const int width = index_bits(n);
  for (int done = 0; done < width;) {
    const int bits = width - done < kRefineBits ? width - done : kRefineBits;
    const int shift = width - done - bits;
    AQL_CHECK_CUDA(fn, cudaMemsetAsync(hist, 0, sizeof(unsigned long long) << bits, stream));
    histogram_candidates_kernel<<<candidate_blocks, kThreads, 0, stream>>>(candidate_keys, candidate_indices,
                                                                          state, 1, shift, bits, hist);
    AQL_CHECK_LAUNCH(fn, "histogram_candidates_kernel");
    pick_bucket_kernel<<<1, 32, 0, stream>>>(hist, bits, kPickIndex, state);
    AQL_CHECK_LAUNCH(fn, "pick_bucket_kernel");
    done += bits;
  }
  finalize_kernel<<<1, 1, 0, stream>>>(state, threshold);
  AQL_CHECK_LAUNCH(fn, "finalize_kernel");
  if (selected == nullptr) return aql::ok();
  scatter_kernel<<<candidate_blocks, kThreads, 0, stream>>>(candidate_keys, candidate_indices, state, selected);
  AQL_CHECK_LAUNCH(fn, "scatter_kernel");

  if (indices != nullptr) {
    const int64_t tiles = (n + kTile - 1) / kTile;
    int tile_blocks = 0;
    status = grid_for(fn, tiles * kThreads, &tile_blocks);  // one block per tile, up to 8 per SM
    if (status != AQL_OK) return status;
    tile_count_kernel<<<tile_blocks, kThreads, 0, stream>>>(selected, n, tiles, tile_counts);
    AQL_CHECK_LAUNCH(fn, "tile_count_kernel");
    scan_kernel<<<1, 1024, 0, stream>>>(tile_counts, tiles);
    AQL_CHECK_LAUNCH(fn, "scan_kernel");
    tile_write_kernel<<<tile_blocks, kThreads, 0, stream>>>(selected, n, tiles, tile_counts, k, indices);
    AQL_CHECK_LAUNCH(fn, "tile_write_kernel");
  }
  return aql::ok();
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
  const aql_status status = grid_for(fn, n, &blocks);
  if (status != AQL_OK) return status;
  const int use_shared = digit_bits <= 13 ? 1 : 0;  // 32 KiB of uint32 counters at most
  const size_t shared_bytes = use_shared ? sizeof(uint32_t) << digit_bits : 0;
  digit_histogram_kernel<<<blocks, kThreads, shared_bytes, s>>>(scores, n, prefix, prefix_bits, digit_bits, use_shared,
                                                               reinterpret_cast<unsigned long long *>(out));
  AQL_CHECK_LAUNCH(fn, "digit_histogram_kernel");
  return aql::ok();
}

}  // extern "C"
