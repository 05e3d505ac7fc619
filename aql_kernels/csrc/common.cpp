// Library-wide entry points, compiled into both libaql_cpu.so (with OpenMP) and libaql_cuda.so.
#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace aql {
char *last_error_buffer() {
  static thread_local char buffer[kErrorBufferSize] = {0};
  return buffer;
}
}  // namespace aql

extern "C" {

AQL_API int32_t aql_abi_version(void) { return AQL_ABI_VERSION; }

AQL_API const char *aql_last_error(void) { return aql::last_error_buffer(); }

AQL_API int32_t aql_num_threads(void) {
#ifdef _OPENMP
  return static_cast<int32_t>(omp_get_max_threads());
#else
  return 1;
#endif
}

}  // extern "C"
