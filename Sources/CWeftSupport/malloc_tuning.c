#include "weft_support.h"
#include <malloc.h>

void weft_bound_malloc(int mmap_threshold_bytes, int arena_max, int trim_threshold_bytes) {
    mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes);
    mallopt(M_ARENA_MAX, arena_max);
    mallopt(M_TRIM_THRESHOLD, trim_threshold_bytes);
}
