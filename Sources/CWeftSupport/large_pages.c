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

#define PAGE ((size_t)4096)
#define LARGE_PAGE ((size_t)2 << 20)

void *weft_pages_map(size_t bytes) { return weft_pages_map_with_header(bytes, 0); }

void *weft_pages_map_with_header(size_t bytes, size_t header) {
    size_t length = (bytes + PAGE - 1) & ~(PAGE - 1);
    if (length == 0) length = PAGE;
    if (length < header + LARGE_PAGE) {
        void *base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        return base == MAP_FAILED ? NULL : base;
    }
    // Map one large page more than needed and trim both ends so that base + header is
    // 2 MiB-aligned.
    char *raw = mmap(NULL, length + LARGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    char *aligned = (char *)(((uintptr_t)raw + header + LARGE_PAGE - 1) & ~(uintptr_t)(LARGE_PAGE - 1));
    char *base = aligned - header;
    size_t head = (size_t)(base - raw);
    if (head > 0) munmap(raw, head);
    size_t tail = LARGE_PAGE - head;
    if (tail > 0) munmap(base + length, tail);
    (void)madvise(aligned, length - header, MADV_HUGEPAGE);  // best effort: EINVAL where THP is compiled out
    return base;
}

void weft_pages_unmap(void *pointer, size_t bytes) {
    if (pointer == NULL) return;
    size_t length = (bytes + PAGE - 1) & ~(PAGE - 1);
    munmap(pointer, length == 0 ? PAGE : length);
}
