/* aql_kernels C ABI, shared by libaql_cpu.so (C++17 + OpenMP) and libaql_cuda.so (CUDA).
 *
 * Rules:
 *  - every function returns an aql_status; AQL_OK (0) means success, anything else means the outputs
 *    are unspecified and aql_last_error() (thread-local) holds a human-readable message;
 *  - pointers are raw device or host pointers owned by the caller (torch); no function allocates
 *    device memory: the CUDA selector takes a caller-allocated workspace;
 *  - CUDA functions take the caller's stream as `void *stream` and never synchronise with the host;
 *  - sizes and strides are int64_t (counted in elements, not bytes).
 */
#ifndef AQL_C_API_H
#define AQL_C_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define AQL_API __declspec(dllexport)
#else
#define AQL_API __attribute__((visibility("default")))
#endif

typedef int32_t aql_status;
enum {
  AQL_OK = 0,
  AQL_ERR_INVALID_ARGUMENT = 1,
  AQL_ERR_TARGET_OUT_OF_RANGE = 2,
  AQL_ERR_CUDA = 3,
  AQL_ERR_UNSUPPORTED = 4,
  AQL_ERR_WORKSPACE_TOO_SMALL = 5,
  AQL_ERR_OUT_OF_MEMORY = 6, /* a host allocation failed */
  AQL_ERR_INTERNAL = 7,      /* a consistency check inside the library failed: a bug, please report it */
};

/* Element types of floating inputs. */
enum {
  AQL_DTYPE_F32 = 0,
  AQL_DTYPE_BF16 = 1,
  AQL_DTYPE_F16 = 2,
};

/* Instruction-set variants of the CPU library's kernels (aql_cpu_isa). */
enum {
  AQL_CPU_ISA_BASELINE = 0, /* x86-64 with SSE2 (or, off x86-64, the compiler's default target) */
  AQL_CPU_ISA_AVX2 = 1,     /* x86-64-v3: AVX2, FMA, F16C, BMI1/2 */
  AQL_CPU_ISA_AVX512 = 2,   /* x86-64-v4: AVX-512 F, BW, DQ, VL, CD */
  AQL_CPU_ISA_NATIVE = 3,   /* built with AQL_NATIVE_ARCH=ON: the build machine's -march=native only */
};

#define AQL_ABI_VERSION 1

/* ---- both libraries ---------------------------------------------------------------------------- */
AQL_API int32_t aql_abi_version(void);
AQL_API const char *aql_last_error(void);
/* Number of OpenMP threads the CPU library uses (1 in the CUDA library). */
AQL_API int32_t aql_num_threads(void);

/* ---- instruction set (CPU library) -------------------------------------------------------------- */
/* The variant the kernels run: the best one built that this CPU supports, at most the one named by
 * the environment variable AQL_CPU_ISA (baseline, avx2, avx512 or native) when that is set at the
 * first call. An AQL_CPU_ISA value outside that list makes every kernel return
 * AQL_ERR_INVALID_ARGUMENT and this function -1. */
AQL_API int32_t aql_cpu_isa(void);
/* Runs the kernels of variant `isa` from now on (tests compare the variants); AQL_ERR_UNSUPPORTED when
 * it was not built or this CPU lacks its instructions. */
AQL_API aql_status aql_cpu_set_isa(int32_t isa);

/* ---- scores (CPU library) ---------------------------------------------------------------------- */
/* Fused softmax statistics over each row of logits[n, v] (row stride `row_stride` elements, unit
 * column stride). targets may be NULL (then loss and el2n are not written and may be NULL).
 * Outputs are float32 [n] except argmax (int64 [n]).
 * A target outside [0, v) other than ignore_index returns AQL_ERR_TARGET_OUT_OF_RANGE. */
AQL_API aql_status aql_softmax_scores(const void *logits, int32_t dtype, int64_t n, int64_t v,
                                      int64_t row_stride, const int64_t *targets,
                                      int64_t ignore_index, float *lse, float *entropy,
                                      float *maxprob, float *margin, int64_t *argmax, float *loss,
                                      float *el2n);

/* grad_logits[i, j] = grad_loss[i] * (softmax(logits[i])[j] - (j == targets[i])), zero rows where
 * targets[i] == ignore_index. lse is the float32 [n] saved by the forward. grad_logits may alias
 * logits (in-place backward) when the dtypes and strides agree. */
AQL_API aql_status aql_softmax_scores_backward(const void *logits, int32_t dtype, int64_t n,
                                               int64_t v, int64_t row_stride,
                                               const int64_t *targets, int64_t ignore_index,
                                               const float *lse, const float *grad_loss,
                                               void *grad_logits, int32_t grad_dtype,
                                               int64_t grad_row_stride);

/* ---- fisher (CPU library) ---------------------------------------------------------------------- */
/* For each i < count with grads[i] != NULL, over numels[i] contiguous elements:
 *   fisher[i] = decay * fisher[i] + (1 - decay) * (scale * grads[i])^2
 * fisher is float32; grads[i] has element type grad_dtypes[i]. decay and scale are double so that
 * 1 - decay is formed before rounding (1 - (float)0.999 is 1.3e-5 off 0.001); the arithmetic is float32. */
AQL_API aql_status aql_fisher_ema(int64_t count, float *const *fisher, const void *const *grads,
                                  const int32_t *grad_dtypes, const int64_t *numels, double decay,
                                  double scale);

/* ---- select (CPU library) ---------------------------------------------------------------------- */
/* Exact top-k of float32 scores[n] (NaN lowest, -0.0 == +0.0, ties to the lowest index).
 * Any of mask (uint8/bool [n]), indices (int64 [k], ascending) and threshold (float32 scalar, the
 * k-th largest value, +inf when k == 0) may be NULL. */
AQL_API aql_status aql_topk_select(const float *scores, int64_t n, int64_t k, uint8_t *mask,
                                   int64_t *indices, float *threshold);

/* out[d] (int64 [2^digit_bits]) = number of i with key(scores[i]) >> (32 - prefix_bits) == prefix
 * and ((key << prefix_bits) >> (32 - digit_bits)) == d, where key is the order-preserving uint32
 * key of the score. 0 <= prefix_bits, 1 <= digit_bits <= 16, prefix_bits + digit_bits <= 32. */
AQL_API aql_status aql_digit_histogram(const float *scores, int64_t n, uint32_t prefix,
                                       int32_t prefix_bits, int32_t digit_bits, int64_t *out);

/* ---- select (CUDA library) --------------------------------------------------------------------- */
/* Bytes of workspace aql_cuda_topk_select needs for n scores. */
AQL_API aql_status aql_cuda_topk_workspace_size(int64_t n, int64_t k, size_t *bytes);
/* Same semantics as aql_topk_select; all pointers are device pointers; `workspace` holds at least
 * aql_cuda_topk_workspace_size bytes; runs on `stream` (a cudaStream_t) without host sync. */
AQL_API aql_status aql_cuda_topk_select(const float *scores, int64_t n, int64_t k, uint8_t *mask,
                                        int64_t *indices, float *threshold, void *workspace,
                                        size_t workspace_bytes, void *stream);
AQL_API aql_status aql_cuda_digit_histogram(const float *scores, int64_t n, uint32_t prefix,
                                            int32_t prefix_bits, int32_t digit_bits, int64_t *out,
                                            void *stream);

#ifdef __cplusplus
}
#endif

#endif /* AQL_C_API_H */
