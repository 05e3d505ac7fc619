// Helpers shared by the CPU and CUDA libraries: error reporting and element-type conversions.
#ifndef AQL_COMMON_H
#define AQL_COMMON_H

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "c_api.h"

namespace aql {

// Thread-local message behind aql_last_error(); defined once per library in common.cpp / common.cu.
char *last_error_buffer();
constexpr size_t kErrorBufferSize = 512;

// Records a printf-style message and returns `status`, so call sites read
//   return aql::fail(AQL_ERR_INVALID_ARGUMENT, "n must be >= 0, got %lld", (long long)n);
inline aql_status fail(aql_status status, const char *format, ...) {
  va_list args;
  va_start(args, format);
  std::vsnprintf(last_error_buffer(), kErrorBufferSize, format, args);
  va_end(args);
  return status;
}

inline aql_status ok() {
  last_error_buffer()[0] = '\0';
  return AQL_OK;
}

// bfloat16 is the top half of a float32.
inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// Round-to-nearest-even float32 -> bfloat16, NaN kept quiet.
inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// IEEE half -> float32, exact for every input (subnormals, inf, NaN).
inline float f16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --exponent;
      }
      bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
    }
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Round-to-nearest-even float32 -> IEEE half.
inline uint16_t float_to_f16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  uint32_t sign = (bits >> 16) & 0x8000u;
  uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs_bits >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (abs_bits < 0x38800000u) {  // result is subnormal or zero
    if (abs_bits < 0x33000000u) return static_cast<uint16_t>(sign);
    uint32_t exponent = abs_bits >> 23;
    uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exponent;  // 14 + (127 - 15 - 1 - exponent) + 1
    uint32_t half = mantissa >> shift;
    uint32_t remainder = mantissa & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1);
    if (remainder > halfway || (remainder == halfway && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t rounded = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13));
}

inline bool valid_dtype(int32_t dtype) {
  return dtype == AQL_DTYPE_F32 || dtype == AQL_DTYPE_BF16 || dtype == AQL_DTYPE_F16;
}

}  // namespace aql

#endif  // AQL_COMMON_H
