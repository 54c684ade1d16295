#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
#include <sys/uio.h>
#include "weft_support.h"

int weft_o_direct_flag(void) { return O_DIRECT; }

/* syncfs(2) needs _GNU_SOURCE, which Swift's Glibc module does not define. */
int weft_syncfs(int fd) { return syncfs(fd); }

long weft_pread_cached(int fd, void *buffer, size_t count, long offset) {
    struct iovec vector = { .iov_base = buffer, .iov_len = count };
    return (long)preadv2(fd, &vector, 1, (off_t)offset, RWF_NOWAIT);
}
