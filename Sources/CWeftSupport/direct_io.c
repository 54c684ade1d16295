#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
#include <sys/uio.h>
#include <sys/resource.h>
#include "weft_support.h"

int weft_o_direct_flag(void) { return O_DIRECT; }

/* syncfs(2) needs _GNU_SOURCE, which Swift's Glibc module does not define. */
int weft_syncfs(int fd) { return syncfs(fd); }

long weft_pread_cached(int fd, void *buffer, size_t count, long offset) {
    struct iovec vector = { .iov_base = buffer, .iov_len = count };
    return (long)preadv2(fd, &vector, 1, (off_t)offset, RWF_NOWAIT);
}

long weft_raise_open_file_limit(void) {
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return -1;
    if (limit.rlim_cur < limit.rlim_max) {
        struct rlimit raised = { .rlim_cur = limit.rlim_max, .rlim_max = limit.rlim_max };
        if (setrlimit(RLIMIT_NOFILE, &raised) == 0) limit = raised;
    }
    return limit.rlim_cur == RLIM_INFINITY ? -1 : (long)limit.rlim_cur;
}
