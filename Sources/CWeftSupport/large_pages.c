// Memory for O_DIRECT transfers backed by transparent huge pages where the kernel has them
// (SPEC.md §7, Slab memory).
//
// A 4 MiB O_DIRECT read into 4 KiB pages reaches the block device as requests of at most
// max_segments pages (254 on virtio-blk: just under 1 MiB each); into 2 MiB pages a segment is
// 2 MiB and the request grows to max_sectors_kb. Each page also costs a fault, a clear and a pin
// per transfer. So a mapping of 2 MiB or more starts on a 2 MiB boundary and is advised
// MADV_HUGEPAGE (the kernel's "madvise" THP mode, Debian's default, backs only advised ranges).
#define _GNU_SOURCE
#include "weft_support.h"
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#define LARGE_PAGE ((size_t)2 << 20)

static size_t page_bytes(void) {
    long page = sysconf(_SC_PAGESIZE);
    return page > 0 ? (size_t)page : 4096;
}

static size_t rounded_length(size_t bytes) {
    size_t page = page_bytes();
    size_t length = (bytes + page - 1) & ~(page - 1);
    return length == 0 ? page : length;
}

// `bytes` (rounded up to pages) such that base + header is on a 2 MiB boundary, advised from
// there on when `advise`. Plain pages, unaligned, when the mapping is too small for a large
// page or the header is not a page multiple (kernels with pages over 4 KiB).
static void *map_aligned(size_t bytes, size_t header, int advise) {
    size_t page = page_bytes();
    size_t length = rounded_length(bytes);
    if (length < header + LARGE_PAGE || header % page != 0 || LARGE_PAGE % page != 0) {
        void *base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        return base == MAP_FAILED ? NULL : base;
    }
    // Map one large page more than needed and trim both ends.
    char *raw = mmap(NULL, length + LARGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    char *aligned = (char *)(((uintptr_t)raw + header + LARGE_PAGE - 1) & ~(uintptr_t)(LARGE_PAGE - 1));
    char *base = aligned - header;
    size_t head = (size_t)(base - raw);
    if (head > 0) munmap(raw, head);
    size_t tail = LARGE_PAGE - head;
    if (tail > 0) munmap(base + length, tail);
    if (advise) (void)madvise(aligned, length - header, MADV_HUGEPAGE);  // best effort: EINVAL without THP
    return base;
}

void *weft_pages_map(size_t bytes) { return map_aligned(bytes, 0, 1); }

void *weft_pages_map_with_header(size_t bytes, size_t header) { return map_aligned(bytes, header, 1); }

void *weft_pages_map_unadvised(size_t bytes) { return map_aligned(bytes, 0, 0); }

void weft_pages_advise(void *pointer, size_t bytes) { (void)madvise(pointer, bytes, MADV_HUGEPAGE); }

void weft_pages_unmap(void *pointer, size_t bytes) {
    if (pointer == NULL) return;
    munmap(pointer, rounded_length(bytes));
}
