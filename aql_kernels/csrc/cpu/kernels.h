// The CPU kernels of one instruction-set variant: the functions of c_api.h without their `aql_`
// prefix, in namespace aql::cpu::<variant>.
//
// CMakeLists.txt compiles every op source once per variant (baseline x86-64, AVX2 = x86-64-v3,
// AVX-512 = x86-64-v4; one `native` variant with AQL_NATIVE_ARCH=ON; one `portable` variant off
// x86-64), each with its own -march and -DAQL_CPU_VARIANT=<variant>. dispatch.cpp declares every
// built variant by including this file once per variant, and the exported `aql_*` functions call
// the best one that the CPU runs (see aql_cpu_isa in c_api.h).
//
// No include guard on purpose: dispatch.cpp includes this once for each value of AQL_CPU_VARIANT.
#include <stdint.h>

#include "../c_api.h"

#ifndef AQL_CPU_VARIANT
#error "AQL_CPU_VARIANT must name the instruction-set variant (the build defines it)"
#endif

namespace aql::cpu::AQL_CPU_VARIANT {

aql_status softmax_scores(const void *logits, int32_t dtype, int64_t n, int64_t v, int64_t row_stride,
                          const int64_t *targets, int64_t ignore_index, float *lse, float *entropy, float *maxprob,
                          float *margin, int64_t *argmax, float *loss, float *el2n);
aql_status softmax_scores_backward(const void *logits, int32_t dtype, int64_t n, int64_t v, int64_t row_stride,
                                   const int64_t *targets, int64_t ignore_index, const float *lse,
                                   const float *grad_loss, void *grad_logits, int32_t grad_dtype,
                                   int64_t grad_row_stride);
aql_status fisher_ema(int64_t count, float *const *fisher, const void *const *grads, const int32_t *grad_dtypes,
                      const int64_t *numels, double decay, double scale);
aql_status topk_select(const float *scores, int64_t n, int64_t k, uint8_t *mask, int64_t *indices,
                       float *threshold);
aql_status digit_histogram(const float *scores, int64_t n, uint32_t prefix, int32_t prefix_bits,
                           int32_t digit_bits, int64_t *out);

}  // namespace aql::cpu::AQL_CPU_VARIANT
