// exp for arguments ≤ 0, written so that a loop over it vectorises (libm's exp is a call per value):
// x = n·ln2 + r with |r| ≤ ln2/2, exp(r) by its Taylor polynomial (degree 7 for float, 12 for
// double: error under one ulp of the result's type on that range), times 2^n built in the exponent
// bits. Below the smallest normal result (x < −87.3 for float, −708 for double) it returns 0; NaN
// stays NaN. Positive arguments (a rounding above a subtracted maximum) work too, up to 88 for float.
// Shared by the CPU extensions (nll_blocks.cpp, swish_layer_norm.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

inline __attribute__((always_inline)) float exp_nonpositive(float x) {
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;  // ln2 split in two
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t biased = int32_t(n < -126.0f ? 0.0f : n) + 127;  // 2^n as float bits
    const int32_t bits = biased << 23;
    float two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    const float value = n < -126.0f ? 0.0f : p * two_n;
    return x != x ? x : value;  // NaN stays NaN
}

inline __attribute__((always_inline)) double exp_nonpositive(double x) {
    const double n = std::floor(x * 1.4426950408889634074 + 0.5);
    const double r = (x - n * 0.693147180369123816490) - n * 1.90821492927058770002e-10;
    double p = 1.0 / 479001600.0;  // 1/12!
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const int64_t biased = int64_t(n < -1022.0 ? 0.0 : n) + 1023;
    const int64_t bits = biased << 52;
    double two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    const double value = n < -1022.0 ? 0.0 : p * two_n;
    return x != x ? x : value;
}
