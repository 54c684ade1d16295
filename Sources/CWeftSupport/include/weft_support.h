#ifndef WEFT_SUPPORT_H
#define WEFT_SUPPORT_H
#include <stddef.h>
#include <stdint.h>
#include <sys/xattr.h>

/// CRC32C (Castagnoli), hardware accelerated with SSE4.2 where the CPU has it.
/// `crc` is the running value: pass 0 for a fresh checksum.
uint32_t weft_crc32c(uint32_t crc, const void *data, size_t length);
/// The same value computed as one dependent chain, never interleaved (tests compare the two).
uint32_t weft_crc32c_serial(uint32_t crc, const void *data, size_t length);

/// Tunes glibc malloc so that buffers of `mmap_threshold_bytes` and more are mapped on their own
/// and returned to the kernel when freed, with at most `arena_max` arenas.
void weft_bound_malloc(int mmap_threshold_bytes, int arena_max, int trim_threshold_bytes);

/// The platform's O_DIRECT open flag (hidden behind _GNU_SOURCE in the Glibc module).
int weft_o_direct_flag(void);

/* syncfs(2): commits every file system change of the file system holding fd. */
int weft_syncfs(int fd);
/// pread(2) that takes only what the page cache holds (preadv2 with RWF_NOWAIT): the bytes read,
/// -1 with errno EAGAIN when the first page is not cached (or EOPNOTSUPP where unsupported).
long weft_pread_cached(int fd, void *buffer, size_t count, long offset);
/// Raises this process's soft limit of open files to its hard limit; returns the soft limit now.
long weft_raise_open_file_limit(void);

/// Caching allocator for transfer buffers (SPEC.md §4, Bulk transfers). Blocks of 64 KiB and
/// more are page-aligned and, when freed, kept for reuse up to the cache limit. Thread-safe.
void *weft_bulk_allocate(size_t size);
void *weft_bulk_reallocate(void *pointer, size_t old_size, size_t new_size);
void weft_bulk_free(void *pointer);
void weft_bulk_copy(void *destination, const void *source, size_t count);
/// Usable bytes of a block from weft_bulk_allocate.
size_t weft_bulk_capacity(const void *pointer);
/// Bytes of freed large blocks kept for reuse (default 64 MiB); shrinks the cache at once.
void weft_bulk_set_cache_limit(size_t bytes);

typedef struct {
    uint64_t mapped;        // large blocks mapped fresh
    uint64_t reused;        // large blocks served from the cache
    uint64_t cached_bytes;  // bytes held in the cache now
} weft_bulk_stats_t;
weft_bulk_stats_t weft_bulk_stats(void);

/// Page-aligned anonymous memory for O_DIRECT transfers (SPEC.md §7, Slab memory): `bytes` of
/// 2 MiB or more start on a 2 MiB boundary and are advised MADV_HUGEPAGE. NULL with errno on
/// failure. Free with weft_pages_unmap and the same `bytes`.
void *weft_pages_map(size_t bytes);
/// The same with a `header` (a page multiple) in front of the aligned part: base + header is on
/// a 2 MiB boundary, and only from there on is advised.
void *weft_pages_map_with_header(size_t bytes, size_t header);
/// The same alignment without the advice: the caller advises (weft_pages_advise) the 2 MiB
/// ranges it will fill, so that a buffer that stays mostly empty keeps small pages.
void *weft_pages_map_unadvised(size_t bytes);
/// madvise(MADV_HUGEPAGE), best effort.
void weft_pages_advise(void *pointer, size_t bytes);
void weft_pages_unmap(void *pointer, size_t bytes);

/// accept4(listener, NULL, NULL, SOCK_CLOEXEC): the new socket is never inherited by a child.
int weft_accept_cloexec(int listener);

// Co-located reads (SPEC.md §4): a listening / connected Unix socket with the abstract name
// `name` (no leading NUL; -1 with errno on failure; the connect and later sends and receives
// bounded by `timeout_ms`), the uid of a Unix socket's peer
// (SO_PEERCRED; 0 or -1), and one message sent or received with at most one descriptor
// (SCM_RIGHTS; `descriptor` -1 for none; received descriptors are close-on-exec). Both return
// the byte count, or -1 with errno.
int weft_listen_abstract(const char *name, int backlog);
int weft_connect_abstract(const char *name, int timeout_ms);
int weft_peer_uid(int socket_fd, unsigned int *uid);
long weft_send_with_descriptor(int socket_fd, const void *bytes, size_t count, int descriptor);
long weft_receive_with_descriptor(int socket_fd, void *bytes, size_t count, int *descriptor);

/// epoll for the hub's reading threads (SPEC.md §4, Serving threads); each returns what the
/// system call does (-1 with errno). Registrations carry `key`, not the descriptor.
int weft_epoll_create(void);
/// EPOLLIN | EPOLLRDHUP | EPOLLONESHOT: one event, then the descriptor waits for a re-arm.
int weft_epoll_add_oneshot(int epoll, int descriptor, uint64_t key);
int weft_epoll_rearm_oneshot(int epoll, int descriptor, uint64_t key);
/// EPOLLIN, level-triggered (a stop event that stays readable wakes every waiter in turn).
int weft_epoll_add_level(int epoll, int descriptor, uint64_t key);
int weft_epoll_remove(int epoll, int descriptor);
/// Waits for one event; on 1 stores its key.
int weft_epoll_wait_one(int epoll, int timeout_ms, uint64_t *key);
/// A non-blocking, close-on-exec eventfd.
int weft_eventfd(void);

#endif
