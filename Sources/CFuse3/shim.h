#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <sys/xattr.h>
#include <linux/fs.h>
#include <linux/fuse.h>
#include <sys/uio.h>
#include <unistd.h>
#include <errno.h>
#include <string.h>

/// Marks the kernel's entry `name` of directory `parent` expired (FUSE_EXPIRE_ONLY, Linux 6.2+):
/// the next lookup of it asks the file system again. Unlike fuse_lowlevel_notify_inval_entry it
/// does not take the directory's lock, so it never waits for an operation in that directory.
/// libfuse 3.14 has no call for it, so the notification is written to the session's fd here.
/// Returns 0, or -errno (-EINVAL from a kernel that does not know the flag).
static inline int weft_notify_expire_entry(struct fuse_session *se, uint64_t parent, const char *name,
                                           size_t namelen) {
    struct fuse_out_header out;
    struct fuse_notify_inval_entry_out arg;
    struct iovec iov[3];
    memset(&arg, 0, sizeof arg);
    arg.parent = parent;
    arg.namelen = (uint32_t)namelen;
    arg.flags = FUSE_EXPIRE_ONLY;
    out.unique = 0;
    out.error = FUSE_NOTIFY_INVAL_ENTRY;
    out.len = (uint32_t)(sizeof out + sizeof arg + namelen + 1);
    iov[0].iov_base = &out;
    iov[0].iov_len = sizeof out;
    iov[1].iov_base = &arg;
    iov[1].iov_len = sizeof arg;
    iov[2].iov_base = (void *)name;
    iov[2].iov_len = namelen + 1;
    ssize_t written = writev(fuse_session_fd(se), iov, 3);
    if (written < 0) return -errno;
    return 0;
}

/// Makes every entry the kernel caches for this mount stale at once (FUSE_NOTIFY_INC_EPOCH,
/// notify code 8, Linux 6.16+): the connection's epoch goes up, and an entry looked up under an
/// older epoch is looked up again before its next use. It takes no lock, so unlike an entry
/// invalidation it never waits for an operation in progress in any directory. Debian 12's
/// headers predate the code, hence the number. Returns 0, or -errno (-EINVAL from an older kernel).
static inline int weft_notify_inc_epoch(struct fuse_session *se) {
    struct fuse_out_header out;
    out.unique = 0;
    out.error = 8;   /* FUSE_NOTIFY_INC_EPOCH */
    out.len = (uint32_t)sizeof out;
    ssize_t written = write(fuse_session_fd(se), &out, sizeof out);
    if (written < 0) return -errno;
    return 0;
}

/// Copies the next `size` bytes of a write's data (`src`, as libfuse hands it to `write_buf`:
/// memory, or with splice reads the pipe the kernel filled with the written pages) to `dst`.
/// Returns the bytes copied (fewer only if the data ended), or -errno.
static inline ssize_t weft_buf_copy_to(void *dst, size_t size, struct fuse_bufvec *src) {
    struct fuse_bufvec to = FUSE_BUFVEC_INIT(size);
    to.buf[0].mem = dst;
    return fuse_buf_copy(&to, src, 0);
}
