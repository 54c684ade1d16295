#include "weft_support.h"
#include <string.h>
#include <nmmintrin.h>
#include <cpuid.h>

static uint32_t table[8][256];
static int table_ready = 0;
static int hardware = -1;

static void build_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
    __atomic_store_n(&table_ready, 1, __ATOMIC_RELEASE);
}

static uint32_t crc_software(uint32_t crc, const uint8_t *p, size_t n) {
    if (!__atomic_load_n(&table_ready, __ATOMIC_ACQUIRE)) build_table();
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        word ^= crc;
        crc = table[7][word & 0xff] ^ table[6][(word >> 8) & 0xff] ^ table[5][(word >> 16) & 0xff] ^
              table[4][(word >> 24) & 0xff] ^ table[3][(word >> 32) & 0xff] ^ table[2][(word >> 40) & 0xff] ^
              table[1][(word >> 48) & 0xff] ^ table[0][word >> 56];
        p += 8; n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    return crc;
}

__attribute__((target("sse4.2")))
static uint32_t crc_hardware(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = _mm_crc32_u64(c, word);
        p += 8; n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}

// Three-way interleaved CRC32C. The crc32 instruction has a latency of 3 cycles and a
// throughput of 1, so one dependent chain runs at a third of the unit's speed. A long buffer is
// cut into three stretches of equal length L, whose CRCs run as three independent chains in one
// loop and are then joined: the CRC register is linear, so crc(c, A||B) = crc(c, A)·x^(8|B|)
// ^ crc(0, B) (mod P, bit-reflected). x^(8L) mod P is computed by squaring (at most a few
// hundred ns) and remembered for the last L seen, which is nearly always the same (64 KiB
// blocks).

#define POLY 0x82F63B78u

// a·b mod P, bit-reflected (the top bit is x^0).
static uint32_t multmodp(uint32_t a, uint32_t b) {
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ POLY : b >> 1;
    }
    return p;
}

// x^(8n) mod P, bit-reflected.
static uint32_t x8nmodp(uint64_t n) {
    uint32_t result = 1u << 31;     // x^0
    uint32_t square = 1u << 23;     // x^8
    while (n) {
        if (n & 1) result = multmodp(square, result);
        square = multmodp(square, square);
        n >>= 1;
    }
    return result;
}

// The last stretch length and its x^(8L), packed as (L << 32) | constant.
static uint64_t shift_cache = 0;

static uint32_t shift_constant(uint64_t stretch) {
    uint64_t cached = __atomic_load_n(&shift_cache, __ATOMIC_RELAXED);
    if ((cached >> 32) == stretch) return (uint32_t)cached;
    uint32_t constant = x8nmodp(stretch);
    __atomic_store_n(&shift_cache, (stretch << 32) | constant, __ATOMIC_RELAXED);
    return constant;
}

#define INTERLEAVE_MIN 3072

__attribute__((target("sse4.2")))
static uint32_t crc_hardware3(uint32_t crc, const uint8_t *p, size_t n) {
    size_t stretch = (n / 3) & ~(size_t)7;
    const uint8_t *a = p, *b = p + stretch, *c = p + 2 * stretch;
    uint64_t ca = crc, cb = 0, cc = 0;
    for (size_t i = 0; i < stretch; i += 8) {
        uint64_t wa, wb, wc;
        memcpy(&wa, a + i, 8);
        memcpy(&wb, b + i, 8);
        memcpy(&wc, c + i, 8);
        ca = _mm_crc32_u64(ca, wa);
        cb = _mm_crc32_u64(cb, wb);
        cc = _mm_crc32_u64(cc, wc);
    }
    uint32_t k = shift_constant(stretch);
    uint32_t joined = multmodp(k, (uint32_t)ca) ^ (uint32_t)cb;
    joined = multmodp(k, joined) ^ (uint32_t)cc;
    return crc_hardware(joined, p + 3 * stretch, n - 3 * stretch);
}

static void detect(void) {
    if (hardware < 0) {
        unsigned a, b, c, d;
        hardware = (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_SSE4_2)) ? 1 : 0;
    }
}

uint32_t weft_crc32c_serial(uint32_t crc, const void *data, size_t length) {
    detect();
    crc = ~crc;
    crc = hardware ? crc_hardware(crc, data, length) : crc_software(crc, data, length);
    return ~crc;
}

uint32_t weft_crc32c(uint32_t crc, const void *data, size_t length) {
    detect();
    crc = ~crc;
    if (hardware && length >= INTERLEAVE_MIN) {
        crc = crc_hardware3(crc, data, length);
    } else {
        crc = hardware ? crc_hardware(crc, data, length) : crc_software(crc, data, length);
    }
    return ~crc;
}
