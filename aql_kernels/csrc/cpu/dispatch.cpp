// The exported entry points of the CPU library: each calls the kernels of the best instruction-set
// variant that was built and that this CPU runs (kernels.h, CMakeLists.txt).
//
// Why runtime dispatch: a library compiled with -march=native uses the build machine's newest
// instructions everywhere (auto-vectorised loops included), and dies with SIGILL on an older CPU.
// Here every op is compiled for a portable baseline, for x86-64-v3 (AVX2) and for x86-64-v4
// (AVX-512); the choice is made once, with the CPU's own feature bits, and costs one indirect call
// per kernel call.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "../common.h"

#if AQL_CPU_WITH_BASELINE
#define AQL_CPU_VARIANT baseline
#include "kernels.h"
#undef AQL_CPU_VARIANT
#endif
#if AQL_CPU_WITH_AVX2
#define AQL_CPU_VARIANT avx2
#include "kernels.h"
#undef AQL_CPU_VARIANT
#endif
#if AQL_CPU_WITH_AVX512
#define AQL_CPU_VARIANT avx512
#include "kernels.h"
#undef AQL_CPU_VARIANT
#endif
#if AQL_CPU_WITH_NATIVE
#define AQL_CPU_VARIANT native
#include "kernels.h"
#undef AQL_CPU_VARIANT
#endif

namespace {

using SoftmaxScores = aql_status (*)(const void *, int32_t, int64_t, int64_t, int64_t, const int64_t *, int64_t, float *,
                                     float *, float *, float *, int64_t *, float *, float *);
using SoftmaxScoresBackward = aql_status (*)(const void *, int32_t, int64_t, int64_t, int64_t, const int64_t *, int64_t,
                                             const float *, const float *, void *, int32_t, int64_t);
using FisherEma = aql_status (*)(int64_t, float *const *, const void *const *, const int32_t *, const int64_t *, double,
                                 double);
using TopkSelect = aql_status (*)(const float *, int64_t, int64_t, uint8_t *, int64_t *, float *);
using DigitHistogram = aql_status (*)(const float *, int64_t, uint32_t, int32_t, int32_t, int64_t *);

struct Kernels {
  int32_t isa;
  const char *name;
  SoftmaxScores softmax_scores;
  SoftmaxScoresBackward softmax_scores_backward;
  FisherEma fisher_ema;
  TopkSelect topk_select;
  DigitHistogram digit_histogram;
};

#if AQL_CPU_WITH_SCORES
#define AQL_SCORES_KERNELS(v) &aql::cpu::v::softmax_scores, &aql::cpu::v::softmax_scores_backward,
#else
#define AQL_SCORES_KERNELS(v) nullptr, nullptr,
#endif
#if AQL_CPU_WITH_FISHER
#define AQL_FISHER_KERNELS(v) &aql::cpu::v::fisher_ema,
#else
#define AQL_FISHER_KERNELS(v) nullptr,
#endif
#if AQL_CPU_WITH_SELECT
#define AQL_SELECT_KERNELS(v) &aql::cpu::v::topk_select, &aql::cpu::v::digit_histogram
#else
#define AQL_SELECT_KERNELS(v) nullptr, nullptr
#endif
#define AQL_KERNELS(isa, v) Kernels{isa, #v, AQL_SCORES_KERNELS(v) AQL_FISHER_KERNELS(v) AQL_SELECT_KERNELS(v)}

// Built variants, in ascending order of instruction set.
const Kernels kVariants[] = {
#if AQL_CPU_WITH_BASELINE
    AQL_KERNELS(AQL_CPU_ISA_BASELINE, baseline),
#endif
#if AQL_CPU_WITH_AVX2
    AQL_KERNELS(AQL_CPU_ISA_AVX2, avx2),
#endif
#if AQL_CPU_WITH_AVX512
    AQL_KERNELS(AQL_CPU_ISA_AVX512, avx512),
#endif
#if AQL_CPU_WITH_NATIVE
    AQL_KERNELS(AQL_CPU_ISA_NATIVE, native),
#endif
};
constexpr int kVariantCount = static_cast<int>(sizeof(kVariants) / sizeof(kVariants[0]));

// Whether this CPU (and its operating system, which must save the wider registers) runs `isa`.
bool cpu_runs(int32_t isa) {
  switch (isa) {
    case AQL_CPU_ISA_BASELINE:
    case AQL_CPU_ISA_NATIVE:  // the user asked for the build machine's instructions
      return true;
#if defined(__x86_64__) && defined(__GNUC__)
    case AQL_CPU_ISA_AVX2:
    case AQL_CPU_ISA_AVX512: {
      __builtin_cpu_init();
#if !defined(__clang__) && __GNUC__ >= 12
      // exactly the feature sets that -march=x86-64-v3 / -v4 may use
      return isa == AQL_CPU_ISA_AVX2 ? __builtin_cpu_supports("x86-64-v3") : __builtin_cpu_supports("x86-64-v4");
#else
      const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
      if (isa == AQL_CPU_ISA_AVX2) return avx2;
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd");
#endif
    }
#endif
    default:
      return false;
  }
}

const Kernels *built(int32_t isa) {
  for (const Kernels &variant : kVariants) {
    if (variant.isa == isa) return &variant;
  }
  return nullptr;
}

// The highest variant that AQL_CPU_ISA allows (AQL_CPU_ISA_NATIVE, i.e. any, when it is unset); -1
// when it names none.
int32_t environment_cap() {
  const char *value = std::getenv("AQL_CPU_ISA");
  if (value == nullptr || value[0] == '\0') return AQL_CPU_ISA_NATIVE;
  static const struct {
    const char *name;
    int32_t isa;
  } kNames[] = {{"baseline", AQL_CPU_ISA_BASELINE}, {"avx2", AQL_CPU_ISA_AVX2}, {"avx512", AQL_CPU_ISA_AVX512},
                {"native", AQL_CPU_ISA_NATIVE}};
  for (const auto &entry : kNames) {
    if (std::strcmp(value, entry.name) == 0) return entry.isa;
  }
  return -1;
}

// The variant in use; set on the first call (a race there only makes two threads compute the same
// answer) or by aql_cpu_set_isa.
std::atomic<const Kernels *> current{nullptr};
const Kernels *choose() {
  const int32_t cap = environment_cap();
  if (cap < 0) return nullptr;  // every call fails and says why (environment_error)
  for (int i = kVariantCount - 1; i >= 0; --i) {
    if (kVariants[i].isa <= cap && cpu_runs(kVariants[i].isa)) return &kVariants[i];
  }
  return &kVariants[0];  // the baseline always runs; a native-only build runs what it was built for
}

inline const Kernels *kernels() {
  const Kernels *chosen = current.load(std::memory_order_acquire);
  if (chosen == nullptr) {
    chosen = choose();
    if (chosen != nullptr) current.store(chosen, std::memory_order_release);
  }
  return chosen;
}

aql_status environment_error(const char *function) {
  const char *value = std::getenv("AQL_CPU_ISA");
  return aql::fail(AQL_ERR_INVALID_ARGUMENT, "%s: AQL_CPU_ISA must be one of baseline, avx2, avx512, native, got '%s'",
                   function, value == nullptr ? "" : value);
}

}  // namespace

extern "C" {

AQL_API int32_t aql_cpu_isa(void) {
  const Kernels *chosen = kernels();
  return chosen == nullptr ? -1 : chosen->isa;
}

AQL_API aql_status aql_cpu_set_isa(int32_t isa) {
  const Kernels *variant = built(isa);
  if (variant == nullptr) return aql::fail(AQL_ERR_UNSUPPORTED, "aql_cpu_set_isa: variant %d was not built", isa);
  if (!cpu_runs(isa)) {
    return aql::fail(AQL_ERR_UNSUPPORTED, "aql_cpu_set_isa: this CPU lacks the instructions of variant %s", variant->name);
  }
  current.store(variant, std::memory_order_release);
  return aql::ok();
}

#define AQL_DISPATCH(function, kernel, ...)                  \
  const Kernels *chosen = kernels();                         \
  if (chosen == nullptr) return environment_error(function); \
  return chosen->kernel(__VA_ARGS__)

#if AQL_CPU_WITH_SCORES
AQL_API aql_status aql_softmax_scores(const void *logits, int32_t dtype, int64_t n, int64_t v, int64_t row_stride,
                                      const int64_t *targets, int64_t ignore_index, float *lse, float *entropy,
                                      float *maxprob, float *margin, int64_t *argmax, float *loss, float *el2n) {
  AQL_DISPATCH("aql_softmax_scores", softmax_scores, logits, dtype, n, v, row_stride, targets, ignore_index, lse, entropy,
               maxprob, margin, argmax, loss, el2n);
}

AQL_API aql_status aql_softmax_scores_backward(const void *logits, int32_t dtype, int64_t n, int64_t v,
                                               int64_t row_stride, const int64_t *targets, int64_t ignore_index,
                                               const float *lse, const float *grad_loss, void *grad_logits,
                                               int32_t grad_dtype, int64_t grad_row_stride) {
  AQL_DISPATCH("aql_softmax_scores_backward", softmax_scores_backward, logits, dtype, n, v, row_stride, targets,
               ignore_index, lse, grad_loss, grad_logits, grad_dtype, grad_row_stride);
}
#endif

#if AQL_CPU_WITH_FISHER
AQL_API aql_status aql_fisher_ema(int64_t count, float *const *fisher, const void *const *grads,
                                  const int32_t *grad_dtypes, const int64_t *numels, double decay, double scale) {
  AQL_DISPATCH("aql_fisher_ema", fisher_ema, count, fisher, grads, grad_dtypes, numels, decay, scale);
}
#endif

#if AQL_CPU_WITH_SELECT
AQL_API aql_status aql_topk_select(const float *scores, int64_t n, int64_t k, uint8_t *mask, int64_t *indices,
                                   float *threshold) {
  AQL_DISPATCH("aql_topk_select", topk_select, scores, n, k, mask, indices, threshold);
}

AQL_API aql_status aql_digit_histogram(const float *scores, int64_t n, uint32_t prefix, int32_t prefix_bits,
                                       int32_t digit_bits, int64_t *out) {
  AQL_DISPATCH("aql_digit_histogram", digit_histogram, scores, n, prefix, prefix_bits, digit_bits, out);
}
#endif

}  // extern "C"
