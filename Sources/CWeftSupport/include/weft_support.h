#ifndef WEFT_SUPPORT_H
#define WEFT_SUPPORT_H
#include <stddef.h>
#include <stdint.h>

/// CRC32C (Castagnoli), hardware accelerated with SSE4.2 where the CPU has it.
/// `crc` is the running value: pass 0 for a fresh checksum.
uint32_t weft_crc32c(uint32_t crc, const void *data, size_t length);

/// Tunes glibc malloc so that buffers of `mmap_threshold_bytes` and more are mapped on their own
/// and returned to the kernel when freed, with at most `arena_max` arenas.
void weft_bound_malloc(int mmap_threshold_bytes, int arena_max, int trim_threshold_bytes);

/// The platform's O_DIRECT open flag (hidden behind _GNU_SOURCE in the Glibc module).
int weft_o_direct_flag(void);

#endif
