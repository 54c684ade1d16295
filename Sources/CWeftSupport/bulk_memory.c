// A caching allocator for large transfer buffers (SPEC.md §4, Bulk transfers).
//
// Blocks under WEFT_BULK_SMALL_LIMIT come from malloc with a 16-byte header in front. Larger
// blocks are page-aligned mmaps in classes of 256 KiB multiples, with a one-page header in
// front of the returned pointer (from 2 MiB on, the returned pointer is 2 MiB-aligned and
// advised for huge pages: weft_pages_map_with_header); a freed one is kept for reuse by an
// allocation of the same class, up to a byte bound, so a stream of 4 MiB frames reuses memory
// it already touched instead of faulting in fresh pages for every frame.
#define _GNU_SOURCE
#include "weft_support.h"
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SMALL_LIMIT ((size_t)64 * 1024)
#define CLASS_BYTES ((size_t)256 * 1024)
#define PAGE ((size_t)4096)
#define MAGIC_SMALL 0x57454654534d4c4cULL  // "WEFTSMLL"
#define MAGIC_LARGE 0x574546544c415247ULL  // "WEFTLARG"
#define MAX_CACHED 256

typedef struct {
    uint64_t magic;
    uint64_t bytes;  // small: the requested size; large: the mapped length, header page included
} header_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
// Cached large blocks (mapping bases), oldest first.
static void *cached[MAX_CACHED];
static size_t cached_bytes_of[MAX_CACHED];
static int cached_count = 0;
static size_t cached_bytes = 0;
static size_t cache_limit = (size_t)64 * 1024 * 1024;
static weft_bulk_stats_t stats;

static header_t *header_of(void *pointer) { return (header_t *)((char *)pointer - sizeof(header_t)); }

void weft_bulk_set_cache_limit(size_t bytes) {
    pthread_mutex_lock(&lock);
    cache_limit = bytes;
    while (cached_bytes > cache_limit && cached_count > 0) {
        void *base = cached[0];
        size_t length = cached_bytes_of[0];
        memmove(cached, cached + 1, sizeof(cached[0]) * (size_t)(cached_count - 1));
        memmove(cached_bytes_of, cached_bytes_of + 1, sizeof(cached_bytes_of[0]) * (size_t)(cached_count - 1));
        cached_count -= 1;
        cached_bytes -= length;
        munmap(base, length);
    }
    pthread_mutex_unlock(&lock);
}

weft_bulk_stats_t weft_bulk_stats(void) {
    pthread_mutex_lock(&lock);
    weft_bulk_stats_t copy = stats;
    copy.cached_bytes = cached_bytes;
    pthread_mutex_unlock(&lock);
    return copy;
}

static void *allocate_large(size_t size) {
    size_t length = PAGE + (size + CLASS_BYTES - 1) / CLASS_BYTES * CLASS_BYTES;
    void *base = NULL;
    pthread_mutex_lock(&lock);
    for (int index = cached_count - 1; index >= 0; index--) {
        if (cached_bytes_of[index] == length) {
            base = cached[index];
            memmove(cached + index, cached + index + 1, sizeof(cached[0]) * (size_t)(cached_count - index - 1));
            memmove(cached_bytes_of + index, cached_bytes_of + index + 1,
                    sizeof(cached_bytes_of[0]) * (size_t)(cached_count - index - 1));
            cached_count -= 1;
            cached_bytes -= length;
            stats.reused += 1;
            break;
        }
    }
    if (base == NULL) stats.mapped += 1;
    pthread_mutex_unlock(&lock);
    if (base == NULL) {
        // The block after the header page starts on a 2 MiB boundary and is advised for huge
        // pages (large_pages.c): a hub's O_DIRECT write of a received object from it reaches
        // the disk in large requests.
        base = weft_pages_map_with_header(length, PAGE);
        if (base == NULL) return NULL;
    }
    void *pointer = (char *)base + PAGE;
    header_t *header = header_of(pointer);
    header->magic = MAGIC_LARGE;
    header->bytes = length;
    return pointer;
}

static void free_large(void *pointer) {
    void *base = (char *)pointer - PAGE;
    size_t length = header_of(pointer)->bytes;
    void *evicted[MAX_CACHED];
    size_t evicted_bytes[MAX_CACHED];
    int evicted_count = 0;
    pthread_mutex_lock(&lock);
    if (length <= cache_limit) {
        // Make room: drop the oldest blocks until this one fits under the bound.
        int drop = 0;
        while ((cached_bytes + length > cache_limit || cached_count - drop == MAX_CACHED) && drop < cached_count) {
            evicted[evicted_count] = cached[drop];
            evicted_bytes[evicted_count] = cached_bytes_of[drop];
            cached_bytes -= cached_bytes_of[drop];
            evicted_count += 1;
            drop += 1;
        }
        if (drop > 0) {
            memmove(cached, cached + drop, sizeof(cached[0]) * (size_t)(cached_count - drop));
            memmove(cached_bytes_of, cached_bytes_of + drop, sizeof(cached_bytes_of[0]) * (size_t)(cached_count - drop));
            cached_count -= drop;
        }
        cached[cached_count] = base;
        cached_bytes_of[cached_count] = length;
        cached_count += 1;
        cached_bytes += length;
        base = NULL;
    }
    pthread_mutex_unlock(&lock);
    for (int index = 0; index < evicted_count; index++) munmap(evicted[index], evicted_bytes[index]);
    if (base != NULL) munmap(base, length);
}

void *weft_bulk_allocate(size_t size) {
    if (size >= SMALL_LIMIT) return allocate_large(size);
    header_t *header = malloc(sizeof(header_t) + size);
    if (header == NULL) return NULL;
    header->magic = MAGIC_SMALL;
    header->bytes = size;
    return header + 1;
}

void weft_bulk_free(void *pointer) {
    if (pointer == NULL) return;
    header_t *header = header_of(pointer);
    if (header->magic == MAGIC_LARGE) {
        free_large(pointer);
    } else {
        // Anything else is a heap corruption: fail loudly rather than free a wild pointer.
        if (header->magic != MAGIC_SMALL) abort();
        header->magic = 0;
        free(header);
    }
}

size_t weft_bulk_capacity(const void *pointer) {
    const header_t *header = (const header_t *)((const char *)pointer - sizeof(header_t));
    return header->magic == MAGIC_LARGE ? header->bytes - PAGE : header->bytes;
}

void *weft_bulk_reallocate(void *pointer, size_t old_size, size_t new_size) {
    if (pointer == NULL) return weft_bulk_allocate(new_size);
    header_t *header = header_of(pointer);
    if (header->magic == MAGIC_LARGE && new_size <= header->bytes - PAGE && new_size >= SMALL_LIMIT) return pointer;
    if (header->magic == MAGIC_SMALL && new_size < SMALL_LIMIT) {
        header_t *moved = realloc(header, sizeof(header_t) + new_size);
        if (moved == NULL) return NULL;
        moved->bytes = new_size;
        return moved + 1;
    }
    void *fresh = weft_bulk_allocate(new_size);
    if (fresh == NULL) return NULL;
    size_t keep = weft_bulk_capacity(pointer);
    if (old_size < keep) keep = old_size;
    if (new_size < keep) keep = new_size;
    memcpy(fresh, pointer, keep);
    weft_bulk_free(pointer);
    return fresh;
}

void weft_bulk_copy(void *destination, const void *source, size_t count) { memcpy(destination, source, count); }
