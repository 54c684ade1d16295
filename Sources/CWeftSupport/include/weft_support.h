#ifndef WEFT_SUPPORT_H
#define WEFT_SUPPORT_H
#include <stddef.h>
#include <stdint.h>

/// CRC32C (Castagnoli), hardware accelerated with SSE4.2 where the CPU has it.
/// `crc` is the running value: pass 0 for a fresh checksum.
uint32_t weft_crc32c(uint32_t crc, const void *data, size_t length);

#endif
