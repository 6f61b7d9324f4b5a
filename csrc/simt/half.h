// Host implementations of CUDA's cuda_fp16.h / cuda_bf16.h names for the SIMT emulator.
//
// Own types rather than CUDA's headers so that the emulated kernels build where no CUDA toolkit
// is installed. Layout (2-byte storage, 4-byte pairs), rounding (round to nearest even) and NaN
// results (canonical 0x7fff) match CUDA. Like CUDA, the implicit conversions and operators are
// left out when __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_HALF_OPERATORS__ /
// __CUDA_NO_HALF2_OPERATORS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ / __CUDA_NO_BFLOAT16_OPERATORS__
// are defined (PyTorch passes these to nvcc), so code that builds here also builds under nvcc.
#pragma once

#include <cstdint>
#include <cstring>

#include "simt/types.h"

namespace simt {
namespace detail {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> IEEE binary16, round to nearest even (F. Giesen's float_to_half_fast3_rtne).
inline uint16_t float_to_half_bits(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u > 0x7f800000u) return 0x7fffu;  // NaN, canonical like CUDA
  if (u >= ((127u + 16u) << 23)) {
    out = 0x7c00u;  // overflow (|f| >= 65536, or inf) -> inf
  } else if (u < (113u << 23)) {
    // Result is subnormal or zero: let the FPU round by adding a magic number.
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    out = uint16_t(float_bits(bits_float(u) + bits_float(magic)) - magic);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu;
    u += mant_odd;
    out = uint16_t(u >> 13);  // values in [65520, 65536) carry into the inf encoding
  }
  return uint16_t(out | (sign >> 16));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    // zero or subnormal: mantissa * 2^-24 is exact in float
    return bits_float(sign | float_bits(float(mantissa) * 5.9604644775390625e-8f));
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// float -> bfloat16, round to nearest even.
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN, canonical like CUDA
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

}  // namespace detail
}  // namespace simt

struct __half_raw {
  unsigned short x;
};

struct __nv_bfloat16_raw {
  unsigned short x;
};

struct alignas(2) __half {
  unsigned short __x;

  __half() = default;
  constexpr __half(const __half_raw& r) : __x(r.x) {}
  __half& operator=(const __half_raw& r) {
    __x = r.x;
    return *this;
  }
  operator __half_raw() const { return __half_raw{__x}; }
#if !defined(__CUDA_NO_HALF_CONVERSIONS__)
  __half(float f) : __x(simt::detail::float_to_half_bits(f)) {}
  __half(double f) : __x(simt::detail::float_to_half_bits(float(f))) {}
  __half(int i) : __half(float(i)) {}
  __half(unsigned i) : __half(float(i)) {}
  __half(long long i) : __half(float(i)) {}
  __half(unsigned long long i) : __half(float(i)) {}
  __half(short i) : __half(float(i)) {}
  __half(unsigned short i) : __half(float(i)) {}
  operator float() const { return simt::detail::half_bits_to_float(__x); }
  __half& operator=(float f) { return *this = __half(f); }
  __half& operator=(double f) { return *this = __half(f); }
#endif
};

struct alignas(2) __nv_bfloat16 {
  unsigned short __x;

  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) {
    __x = r.x;
    return *this;
  }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
#if !defined(__CUDA_NO_BFLOAT16_CONVERSIONS__)
  __nv_bfloat16(float f) : __x(simt::detail::float_to_bf16_bits(f)) {}
  __nv_bfloat16(double f) : __x(simt::detail::float_to_bf16_bits(float(f))) {}
  __nv_bfloat16(int i) : __nv_bfloat16(float(i)) {}
  __nv_bfloat16(unsigned i) : __nv_bfloat16(float(i)) {}
  __nv_bfloat16(long long i) : __nv_bfloat16(float(i)) {}
  __nv_bfloat16(unsigned long long i) : __nv_bfloat16(float(i)) {}
  __nv_bfloat16(short i) : __nv_bfloat16(float(i)) {}
  __nv_bfloat16(unsigned short i) : __nv_bfloat16(float(i)) {}
  operator float() const { return simt::detail::bf16_bits_to_float(__x); }
  __nv_bfloat16& operator=(float f) { return *this = __nv_bfloat16(f); }
  __nv_bfloat16& operator=(double f) { return *this = __nv_bfloat16(f); }
#endif
};

struct alignas(4) __half2 {
  __half x;
  __half y;
};

struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x;
  __nv_bfloat16 y;
};

typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage");
static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "32-bit pairs");

// ---- bit casts ----
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return short(h.__x); }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
inline __half __short_as_half(short s) { return __half_raw{static_cast<unsigned short>(s)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return short(b.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16_raw{u}; }
inline __nv_bfloat16 __short_as_bfloat16(short s) {
  return __nv_bfloat16_raw{static_cast<unsigned short>(s)};
}

// ---- conversions (the names kernels should use: they work with or without the
// __CUDA_NO_*_CONVERSIONS__ macros) ----
inline __half __float2half(float f) { return __half_raw{simt::detail::float_to_half_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __double2half(double d) { return __float2half(float(d)); }
inline float __half2float(__half h) { return simt::detail::half_bits_to_float(h.__x); }
inline __half __int2half_rn(int i) { return __float2half(float(i)); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }
inline __half2 __float2half2_rn(float a) { return {__float2half(a), __float2half(a)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __half2half2(__half a) { return {a, a}; }
inline __half2 make_half2(__half a, __half b) { return {a, b}; }

inline __nv_bfloat16 __float2bfloat16(float f) {
  return __nv_bfloat16_raw{simt::detail::float_to_bf16_bits(f)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __float2bfloat16(float(d)); }
inline float __bfloat162float(__nv_bfloat16 b) { return simt::detail::bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __float2bfloat16(float(i)); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16(a), __float2bfloat16(b)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) {
  return {__float2bfloat16(a), __float2bfloat16(a)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 b) {
  return {__bfloat162float(b.x), __bfloat162float(b.y)};
}
inline float __low2float(__nv_bfloat162 b) { return __bfloat162float(b.x); }
inline float __high2float(__nv_bfloat162 b) { return __bfloat162float(b.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 b) { return b.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 b) { return b.y; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat16 __half2bfloat16(__half h) { return __float2bfloat16(__half2float(h)); }
inline __half __bfloat162half(__nv_bfloat16 b) { return __float2half(__bfloat162float(b)); }

// ---- arithmetic intrinsics: computed in float and rounded once; for +, -, *, / that equals
// the correctly rounded 16-bit result, because float carries more than 2p+2 bits ----
#define SIMT_HALF_BINARY(name, op)                                                          \
  inline __half name(__half a, __half b) {                                                  \
    return __float2half(__half2float(a) op __half2float(b));                                \
  }                                                                                         \
  inline __nv_bfloat16 name(__nv_bfloat16 a, __nv_bfloat16 b) {                             \
    return __float2bfloat16(__bfloat162float(a) op __bfloat162float(b));                    \
  }                                                                                         \
  inline __half2 name##2(__half2 a, __half2 b) { return {name(a.x, b.x), name(a.y, b.y)}; } \
  inline __nv_bfloat162 name##2(__nv_bfloat162 a, __nv_bfloat162 b) {                       \
    return {name(a.x, b.x), name(a.y, b.y)};                                                \
  }
SIMT_HALF_BINARY(__hadd, +)
SIMT_HALF_BINARY(__hsub, -)
SIMT_HALF_BINARY(__hmul, *)
SIMT_HALF_BINARY(__hdiv, /)
#undef SIMT_HALF_BINARY

inline __half __hfma(__half a, __half b, __half c) {
  return __float2half(float(double(__half2float(a)) * __half2float(b) + __half2float(c)));
}
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __float2bfloat16(
      float(double(__bfloat162float(a)) * __bfloat162float(b) + __bfloat162float(c)));
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
inline __half __hneg(__half a) {
  return __ushort_as_half(static_cast<unsigned short>(a.__x ^ 0x8000u));
}
inline __nv_bfloat16 __hneg(__nv_bfloat16 a) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(a.__x ^ 0x8000u));
}
inline __half __habs(__half a) {
  return __ushort_as_half(static_cast<unsigned short>(a.__x & 0x7fffu));
}
inline __nv_bfloat16 __habs(__nv_bfloat16 a) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(a.__x & 0x7fffu));
}
inline __half __hmax(__half a, __half b) {
  return __half2float(a) >= __half2float(b) || __half2float(b) != __half2float(b) ? a : b;
}
inline __half __hmin(__half a, __half b) {
  return __half2float(a) <= __half2float(b) || __half2float(b) != __half2float(b) ? a : b;
}
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __bfloat162float(a) >= __bfloat162float(b) || __bfloat162float(b) != __bfloat162float(b)
             ? a
             : b;
}
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __bfloat162float(a) <= __bfloat162float(b) || __bfloat162float(b) != __bfloat162float(b)
             ? a
             : b;
}
inline bool __hisnan(__half a) { return (a.__x & 0x7fffu) > 0x7c00u; }
inline bool __hisnan(__nv_bfloat16 a) { return (a.__x & 0x7fffu) > 0x7f80u; }

// ---- operators (CUDA provides them unless __CUDA_NO_*_OPERATORS__) ----
#if !defined(__CUDA_NO_HALF_OPERATORS__)
inline __half operator+(const __half& a, const __half& b) { return __hadd(a, b); }
inline __half operator-(const __half& a, const __half& b) { return __hsub(a, b); }
inline __half operator*(const __half& a, const __half& b) { return __hmul(a, b); }
inline __half operator/(const __half& a, const __half& b) { return __hdiv(a, b); }
inline __half operator-(const __half& a) { return __hneg(a); }
inline __half operator+(const __half& a) { return a; }
inline __half& operator+=(__half& a, const __half& b) { return a = __hadd(a, b); }
inline __half& operator-=(__half& a, const __half& b) { return a = __hsub(a, b); }
inline __half& operator*=(__half& a, const __half& b) { return a = __hmul(a, b); }
inline __half& operator/=(__half& a, const __half& b) { return a = __hdiv(a, b); }
inline bool operator==(const __half& a, const __half& b) {
  return __half2float(a) == __half2float(b);
}
inline bool operator!=(const __half& a, const __half& b) {
  return __half2float(a) != __half2float(b);
}
inline bool operator<(const __half& a, const __half& b) {
  return __half2float(a) < __half2float(b);
}
inline bool operator<=(const __half& a, const __half& b) {
  return __half2float(a) <= __half2float(b);
}
inline bool operator>(const __half& a, const __half& b) {
  return __half2float(a) > __half2float(b);
}
inline bool operator>=(const __half& a, const __half& b) {
  return __half2float(a) >= __half2float(b);
}
#endif
#if !defined(__CUDA_NO_HALF2_OPERATORS__)
inline __half2 operator+(const __half2& a, const __half2& b) { return __hadd2(a, b); }
inline __half2 operator-(const __half2& a, const __half2& b) { return __hsub2(a, b); }
inline __half2 operator*(const __half2& a, const __half2& b) { return __hmul2(a, b); }
inline __half2 operator/(const __half2& a, const __half2& b) { return __hdiv2(a, b); }
inline __half2& operator+=(__half2& a, const __half2& b) { return a = __hadd2(a, b); }
inline __half2& operator*=(__half2& a, const __half2& b) { return a = __hmul2(a, b); }
#endif
#if !defined(__CUDA_NO_BFLOAT16_OPERATORS__)
inline __nv_bfloat16 operator+(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __hadd(a, b);
}
inline __nv_bfloat16 operator-(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __hsub(a, b);
}
inline __nv_bfloat16 operator*(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __hmul(a, b);
}
inline __nv_bfloat16 operator/(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __hdiv(a, b);
}
inline __nv_bfloat16 operator-(const __nv_bfloat16& a) { return __hneg(a); }
inline __nv_bfloat16 operator+(const __nv_bfloat16& a) { return a; }
inline __nv_bfloat16& operator+=(__nv_bfloat16& a, const __nv_bfloat16& b) {
  return a = __hadd(a, b);
}
inline __nv_bfloat16& operator-=(__nv_bfloat16& a, const __nv_bfloat16& b) {
  return a = __hsub(a, b);
}
inline __nv_bfloat16& operator*=(__nv_bfloat16& a, const __nv_bfloat16& b) {
  return a = __hmul(a, b);
}
inline __nv_bfloat16& operator/=(__nv_bfloat16& a, const __nv_bfloat16& b) {
  return a = __hdiv(a, b);
}
inline bool operator==(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __bfloat162float(a) == __bfloat162float(b);
}
inline bool operator!=(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __bfloat162float(a) != __bfloat162float(b);
}
inline bool operator<(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __bfloat162float(a) < __bfloat162float(b);
}
inline bool operator<=(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __bfloat162float(a) <= __bfloat162float(b);
}
inline bool operator>(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __bfloat162float(a) > __bfloat162float(b);
}
inline bool operator>=(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __bfloat162float(a) >= __bfloat162float(b);
}
inline __nv_bfloat162 operator+(const __nv_bfloat162& a, const __nv_bfloat162& b) {
  return __hadd2(a, b);
}
inline __nv_bfloat162 operator-(const __nv_bfloat162& a, const __nv_bfloat162& b) {
  return __hsub2(a, b);
}
inline __nv_bfloat162 operator*(const __nv_bfloat162& a, const __nv_bfloat162& b) {
  return __hmul2(a, b);
}
inline __nv_bfloat162& operator+=(__nv_bfloat162& a, const __nv_bfloat162& b) {
  return a = __hadd2(a, b);
}
#endif
