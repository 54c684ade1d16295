/*
 * memfs: a minimal memory-backed libfuse3 low-level file system.
 *
 * It exists only to measure this machine's FUSE ceiling for Weft's benchmark:
 * every request is answered from memory with no I/O, so the throughput it
 * reaches is the most any FUSE file system can reach here.
 *
 * Guarantees: regular files and directories with create, lookup, getattr,
 * setattr (mode, owner, size, times), read, write, fsync (a no-op), mkdir,
 * unlink, rmdir, rename (flags 0 only), readdir and statfs. No symlinks, hard
 * links or extended attributes (ENOSYS). Data is lost at unmount.
 *
 * Limits: file data lives in 1 MiB blocks (MEMFS_BLOCK_BYTES); names are at
 * most NAME_MAX bytes; memory use is bounded only by what is written, so the
 * benchmark must not write more than the machine's RAM. Freed blocks are kept
 * for reuse, so the process never shrinks: its size is its peak.
 *
 * Locking: one mutex (namespaceLock) guards the name table, link and lookup
 * counts; one rwlock per inode guards its data, size and times.
 *
 * Build: gcc -O2 -Wall memfs.c $(pkg-config --cflags --libs fuse3) -lpthread
 * Run:   memfs MOUNTPOINT -f [--prefault-mb=N]   (max_read=1048576 is always added)
 *        --prefault-mb touches N MiB of block pool before mounting, so that writes of up
 *        to N MiB measure FUSE and memcpy rather than the kernel's first-touch page faults.
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <fuse_lowlevel.h>

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MEMFS_BLOCK_BYTES (1u << 20)
#define MEMFS_MAX_IO_BYTES (1u << 20)
#define MEMFS_CACHE_TIMEOUT_SECONDS 1.0
#define MEMFS_MAX_IOV (MEMFS_MAX_IO_BYTES / MEMFS_BLOCK_BYTES + 3)
#define MEMFS_SMALL_MIN_BYTES 4096u
#define MEMFS_REGION_BYTES (64u << 20)
#define MEMFS_HUGE_PAGE_BYTES (2u << 20)

struct node;

/* One name in one directory; also a link in the global name hash table. */
struct dentry {
    struct node *parent;
    struct node *child;
    struct dentry *hashNext;
    struct dentry *siblingPrev, *siblingNext;
    size_t nameLength;
    char name[];
};

struct node {
    pthread_rwlock_t lock;      /* data, size, times, mode */
    mode_t mode;
    uid_t uid;
    gid_t gid;
    off_t sizeBytes;
    struct timespec atime, mtime, ctime;
    /* guarded by namespaceLock */
    nlink_t linkCount;
    uint64_t lookupCount;
    struct dentry *children;    /* directories: head of sibling list */
    size_t childCount;
    struct node *dotdot;        /* directories: parent */
    /* regular files: data blocks, NULL for holes */
    char **blocks;
    size_t blockCapacity;
    size_t smallBytes; /* > 0: blocks[0] is a malloc'd buffer this long (small files), not a pool block */
};

static pthread_mutex_t namespaceLock = PTHREAD_MUTEX_INITIALIZER;
static struct dentry **hashTable;
static size_t hashBuckets = 1u << 16;
static size_t hashCount;
static struct node *rootNode;
static char zeroBlock[MEMFS_BLOCK_BYTES]; /* never written: the source for holes */

/*
 * Data blocks come from 64 MiB regions backed by transparent huge pages and go
 * back to a free list, never to the kernel: a first touch of a 4 KiB page costs
 * far more than the copy on a virtual machine, and that cost is not FUSE's.
 */
static pthread_mutex_t poolLock = PTHREAD_MUTEX_INITIALIZER;
static void *freeBlocks; /* each free block holds the next pointer in its first word */

static char *allocateBlock(void)
{
    pthread_mutex_lock(&poolLock);
    if (!freeBlocks) {
        size_t mappedBytes = MEMFS_REGION_BYTES + MEMFS_HUGE_PAGE_BYTES;
        char *mapped = mmap(NULL, mappedBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mapped == MAP_FAILED) {
            pthread_mutex_unlock(&poolLock);
            return NULL;
        }
        char *region = (char *)(((uintptr_t)mapped + MEMFS_HUGE_PAGE_BYTES - 1) & ~(uintptr_t)(MEMFS_HUGE_PAGE_BYTES - 1));
        if (region > mapped)
            munmap(mapped, (size_t)(region - mapped));
        char *regionEnd = region + MEMFS_REGION_BYTES;
        if (mapped + mappedBytes > regionEnd)
            munmap(regionEnd, (size_t)(mapped + mappedBytes - regionEnd));
        madvise(region, MEMFS_REGION_BYTES, MADV_HUGEPAGE);
        for (char *block = regionEnd - MEMFS_BLOCK_BYTES; block >= region; block -= MEMFS_BLOCK_BYTES) {
            *(void **)block = freeBlocks;
            freeBlocks = block;
        }
    }
    char *block = freeBlocks;
    freeBlocks = *(void **)block;
    pthread_mutex_unlock(&poolLock);
    return block;
}

static void releaseBlock(char *block)
{
    if (!block)
        return;
    pthread_mutex_lock(&poolLock);
    *(void **)block = freeBlocks;
    freeBlocks = block;
    pthread_mutex_unlock(&poolLock);
}

/* Touches blockCount pool blocks up front, so that writes measure FUSE and the copy, not page faults. */
static int prefaultPool(size_t blockCount)
{
    char **taken = malloc(blockCount * sizeof(*taken));
    if (!taken)
        return -1;
    size_t count = 0;
    while (count < blockCount && (taken[count] = allocateBlock()) != NULL) {
        memset(taken[count], 0, MEMFS_BLOCK_BYTES);
        count++;
    }
    for (size_t i = 0; i < count; i++)
        releaseBlock(taken[i]);
    free(taken);
    return count == blockCount ? 0 : -1;
}

static struct node *nodeOf(fuse_ino_t ino)
{
    return ino == FUSE_ROOT_ID ? rootNode : (struct node *)(uintptr_t)ino;
}

static fuse_ino_t inoOf(struct node *node)
{
    return node == rootNode ? FUSE_ROOT_ID : (fuse_ino_t)(uintptr_t)node;
}

static size_t hashName(const struct node *parent, const char *name, size_t length)
{
    uint64_t hash = 1469598103934665603ull ^ (uint64_t)(uintptr_t)parent;
    for (size_t i = 0; i < length; i++) {
        hash ^= (unsigned char)name[i];
        hash *= 1099511628211ull;
    }
    return (size_t)(hash ^ (hash >> 29));
}

static void hashGrowLocked(void)
{
    size_t newBuckets = hashBuckets * 2;
    struct dentry **newTable = calloc(newBuckets, sizeof(*newTable));
    if (!newTable)
        return; /* keep the old table: lookups only get slower */
    for (size_t b = 0; b < hashBuckets; b++) {
        struct dentry *entry = hashTable[b];
        while (entry) {
            struct dentry *next = entry->hashNext;
            size_t slot = hashName(entry->parent, entry->name, entry->nameLength) & (newBuckets - 1);
            entry->hashNext = newTable[slot];
            newTable[slot] = entry;
            entry = next;
        }
    }
    free(hashTable);
    hashTable = newTable;
    hashBuckets = newBuckets;
}

static struct dentry **findSlotLocked(struct node *parent, const char *name)
{
    size_t length = strlen(name);
    struct dentry **slot = &hashTable[hashName(parent, name, length) & (hashBuckets - 1)];
    while (*slot) {
        struct dentry *entry = *slot;
        if (entry->parent == parent && entry->nameLength == length && memcmp(entry->name, name, length) == 0)
            return slot;
        slot = &entry->hashNext;
    }
    return slot;
}

static struct node *newNode(mode_t mode, const struct fuse_ctx *ctx)
{
    struct node *node = calloc(1, sizeof(*node));
    if (!node)
        return NULL;
    pthread_rwlock_init(&node->lock, NULL);
    node->mode = mode;
    node->uid = ctx ? ctx->uid : getuid();
    node->gid = ctx ? ctx->gid : getgid();
    clock_gettime(CLOCK_REALTIME, &node->atime);
    node->mtime = node->ctime = node->atime;
    node->linkCount = S_ISDIR(mode) ? 2 : 1;
    return node;
}

/* Frees one data block, whichever allocator it came from. */
static void dropBlock(struct node *node, size_t index)
{
    if (index == 0 && node->smallBytes) {
        free(node->blocks[0]);
        node->smallBytes = 0;
    } else {
        releaseBlock(node->blocks[index]);
    }
    node->blocks[index] = NULL;
}

/* Bytes block index really holds: small files keep a short first block. */
static size_t blockBytes(const struct node *node, size_t index)
{
    return index == 0 && node->smallBytes ? node->smallBytes : MEMFS_BLOCK_BYTES;
}

static void freeNode(struct node *node)
{
    for (size_t i = 0; i < node->blockCapacity; i++)
        dropBlock(node, i);
    free(node->blocks);
    pthread_rwlock_destroy(&node->lock);
    free(node);
}

/* Frees the node once no name and no kernel reference points at it. */
static void maybeFreeLocked(struct node *node)
{
    if (node != rootNode && node->linkCount == 0 && node->lookupCount == 0)
        freeNode(node);
}

static int linkLocked(struct node *parent, const char *name, struct node *child)
{
    size_t length = strlen(name);
    if (length > NAME_MAX)
        return ENAMETOOLONG;
    struct dentry **slot = findSlotLocked(parent, name);
    if (*slot)
        return EEXIST;
    struct dentry *entry = malloc(sizeof(*entry) + length + 1);
    if (!entry)
        return ENOMEM;
    entry->parent = parent;
    entry->child = child;
    entry->hashNext = NULL;
    entry->nameLength = length;
    memcpy(entry->name, name, length + 1);
    *slot = entry;
    entry->siblingPrev = NULL;
    entry->siblingNext = parent->children;
    if (parent->children)
        parent->children->siblingPrev = entry;
    parent->children = entry;
    parent->childCount++;
    if (++hashCount > hashBuckets)
        hashGrowLocked();
    return 0;
}

static void unlinkEntryLocked(struct dentry **slot)
{
    struct dentry *entry = *slot;
    *slot = entry->hashNext;
    if (entry->siblingPrev)
        entry->siblingPrev->siblingNext = entry->siblingNext;
    else
        entry->parent->children = entry->siblingNext;
    if (entry->siblingNext)
        entry->siblingNext->siblingPrev = entry->siblingPrev;
    entry->parent->childCount--;
    hashCount--;
    free(entry);
}

static void fillStat(struct node *node, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = inoOf(node);
    st->st_mode = node->mode;
    st->st_nlink = node->linkCount;
    st->st_uid = node->uid;
    st->st_gid = node->gid;
    st->st_size = node->sizeBytes;
    st->st_blksize = MEMFS_BLOCK_BYTES;
    st->st_blocks = (node->sizeBytes + 511) / 512;
    st->st_atim = node->atime;
    st->st_mtim = node->mtime;
    st->st_ctim = node->ctime;
}

/* Replies with an entry for node and takes one kernel reference. Caller holds namespaceLock. */
static void replyEntryLocked(fuse_req_t req, struct node *node, struct fuse_file_info *fi)
{
    struct fuse_entry_param entry;
    memset(&entry, 0, sizeof(entry));
    entry.ino = inoOf(node);
    entry.attr_timeout = MEMFS_CACHE_TIMEOUT_SECONDS;
    entry.entry_timeout = MEMFS_CACHE_TIMEOUT_SECONDS;
    pthread_rwlock_rdlock(&node->lock);
    fillStat(node, &entry.attr);
    pthread_rwlock_unlock(&node->lock);
    node->lookupCount++;
    int failed = fi ? fuse_reply_create(req, &entry, fi) : fuse_reply_entry(req, &entry);
    if (failed)
        node->lookupCount--; /* the kernel never saw it */
}

static void memfsLookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    pthread_mutex_lock(&namespaceLock);
    struct dentry **slot = findSlotLocked(nodeOf(parent), name);
    if (*slot)
        replyEntryLocked(req, (*slot)->child, NULL);
    else
        fuse_reply_err(req, ENOENT);
    pthread_mutex_unlock(&namespaceLock);
}

static void forgetOne(fuse_ino_t ino, uint64_t count)
{
    struct node *node = nodeOf(ino);
    assert(node->lookupCount >= count);
    node->lookupCount -= count;
    maybeFreeLocked(node);
}

static void memfsForget(fuse_req_t req, fuse_ino_t ino, uint64_t count)
{
    pthread_mutex_lock(&namespaceLock);
    forgetOne(ino, count);
    pthread_mutex_unlock(&namespaceLock);
    fuse_reply_none(req);
}

static void memfsForgetMulti(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    pthread_mutex_lock(&namespaceLock);
    for (size_t i = 0; i < count; i++)
        forgetOne(forgets[i].ino, forgets[i].nlookup);
    pthread_mutex_unlock(&namespaceLock);
    fuse_reply_none(req);
}

static void memfsGetattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)fi;
    struct node *node = nodeOf(ino);
    struct stat st;
    pthread_mutex_lock(&namespaceLock); /* linkCount */
    pthread_rwlock_rdlock(&node->lock);
    fillStat(node, &st);
    pthread_rwlock_unlock(&node->lock);
    pthread_mutex_unlock(&namespaceLock);
    fuse_reply_attr(req, &st, MEMFS_CACHE_TIMEOUT_SECONDS);
}

/* Drops data beyond newSize and zeroes the tail of the last partial block. Caller holds node->lock for writing. */
static void truncateLocked(struct node *node, off_t newSize)
{
    if (newSize < node->sizeBytes) {
        size_t firstDropped = (size_t)((newSize + MEMFS_BLOCK_BYTES - 1) / MEMFS_BLOCK_BYTES);
        for (size_t i = firstDropped; i < node->blockCapacity; i++)
            dropBlock(node, i);
        size_t tailBlock = (size_t)(newSize / MEMFS_BLOCK_BYTES);
        size_t tailOffset = (size_t)(newSize % MEMFS_BLOCK_BYTES);
        if (tailOffset && tailBlock < node->blockCapacity && node->blocks[tailBlock]) {
            size_t held = blockBytes(node, tailBlock);
            if (tailOffset < held)
                memset(node->blocks[tailBlock] + tailOffset, 0, held - tailOffset);
        }
    }
    node->sizeBytes = newSize;
}

static void memfsSetattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int toSet, struct fuse_file_info *fi)
{
    (void)fi;
    struct node *node = nodeOf(ino);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    pthread_rwlock_wrlock(&node->lock);
    if (toSet & FUSE_SET_ATTR_MODE)
        node->mode = (node->mode & S_IFMT) | (attr->st_mode & 07777);
    if (toSet & FUSE_SET_ATTR_UID)
        node->uid = attr->st_uid;
    if (toSet & FUSE_SET_ATTR_GID)
        node->gid = attr->st_gid;
    if (toSet & FUSE_SET_ATTR_SIZE) {
        if (!S_ISREG(node->mode)) {
            pthread_rwlock_unlock(&node->lock);
            fuse_reply_err(req, S_ISDIR(node->mode) ? EISDIR : EINVAL);
            return;
        }
        truncateLocked(node, attr->st_size);
        node->mtime = now;
    }
    if (toSet & FUSE_SET_ATTR_ATIME)
        node->atime = attr->st_atim;
    if (toSet & FUSE_SET_ATTR_ATIME_NOW)
        node->atime = now;
    if (toSet & FUSE_SET_ATTR_MTIME)
        node->mtime = attr->st_mtim;
    if (toSet & FUSE_SET_ATTR_MTIME_NOW)
        node->mtime = now;
    node->ctime = now;
    pthread_rwlock_unlock(&node->lock);
    memfsGetattr(req, ino, NULL);
}

/* Creates a file or directory under parent; replies with an entry (or create reply when fi is set). */
static void makeNode(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
    struct node *parentNode = nodeOf(parent);
    if (!S_ISDIR(parentNode->mode)) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    struct node *node = newNode(mode, fuse_req_ctx(req));
    if (!node) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    pthread_mutex_lock(&namespaceLock);
    int error = linkLocked(parentNode, name, node);
    if (error) {
        pthread_mutex_unlock(&namespaceLock);
        freeNode(node);
        fuse_reply_err(req, error);
        return;
    }
    if (S_ISDIR(mode)) {
        node->dotdot = parentNode;
        parentNode->linkCount++;
    }
    clock_gettime(CLOCK_REALTIME, &parentNode->mtime);
    parentNode->ctime = parentNode->mtime;
    replyEntryLocked(req, node, fi);
    pthread_mutex_unlock(&namespaceLock);
}

static void memfsMknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
    (void)rdev;
    if (!S_ISREG(mode)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    makeNode(req, parent, name, mode, NULL);
}

static void memfsMkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    makeNode(req, parent, name, S_IFDIR | (mode & 07777), NULL);
}

static void memfsCreate(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
    makeNode(req, parent, name, S_IFREG | (mode & 07777), fi);
}

static void removeName(fuse_req_t req, fuse_ino_t parent, const char *name, int wantDirectory)
{
    pthread_mutex_lock(&namespaceLock);
    struct node *parentNode = nodeOf(parent);
    struct dentry **slot = findSlotLocked(parentNode, name);
    int error = 0;
    if (!*slot) {
        error = ENOENT;
    } else {
        struct node *child = (*slot)->child;
        if (wantDirectory && !S_ISDIR(child->mode))
            error = ENOTDIR;
        else if (!wantDirectory && S_ISDIR(child->mode))
            error = EISDIR;
        else if (wantDirectory && child->childCount > 0)
            error = ENOTEMPTY;
        if (!error) {
            unlinkEntryLocked(slot);
            if (wantDirectory) {
                parentNode->linkCount--;
                child->linkCount = 0;
            } else {
                child->linkCount--;
            }
            clock_gettime(CLOCK_REALTIME, &child->ctime);
            parentNode->mtime = parentNode->ctime = child->ctime;
            maybeFreeLocked(child);
        }
    }
    pthread_mutex_unlock(&namespaceLock);
    fuse_reply_err(req, error);
}

static void memfsUnlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    removeName(req, parent, name, 0);
}

static void memfsRmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    removeName(req, parent, name, 1);
}

static void memfsRename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newParent,
                        const char *newName, unsigned int flags)
{
    if (flags) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    pthread_mutex_lock(&namespaceLock);
    struct node *from = nodeOf(parent), *to = nodeOf(newParent);
    struct dentry **source = findSlotLocked(from, name);
    int error = 0;
    if (!*source) {
        error = ENOENT;
    } else {
        struct node *moving = (*source)->child;
        struct dentry **target = findSlotLocked(to, newName);
        if (*target && (*target)->child == moving)
            goto done; /* same inode: nothing to do */
        if (*target) {
            struct node *victim = (*target)->child;
            if (S_ISDIR(victim->mode) && !S_ISDIR(moving->mode))
                error = EISDIR;
            else if (!S_ISDIR(victim->mode) && S_ISDIR(moving->mode))
                error = ENOTDIR;
            else if (S_ISDIR(victim->mode) && victim->childCount > 0)
                error = ENOTEMPTY;
            if (error)
                goto done;
            unlinkEntryLocked(target);
            if (S_ISDIR(victim->mode)) {
                to->linkCount--;
                victim->linkCount = 0;
            } else {
                victim->linkCount--;
            }
            maybeFreeLocked(victim);
            source = findSlotLocked(from, name); /* the chain may have changed */
        }
        unlinkEntryLocked(source);
        error = linkLocked(to, newName, moving);
        if (!error && S_ISDIR(moving->mode) && from != to) {
            from->linkCount--;
            to->linkCount++;
            moving->dotdot = to;
        }
    }
done:
    pthread_mutex_unlock(&namespaceLock);
    fuse_reply_err(req, error);
}

static void memfsOpen(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (S_ISDIR(nodeOf(ino)->mode)) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    fuse_reply_open(req, fi);
}

static void memfsRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, struct fuse_file_info *fi)
{
    (void)fi;
    struct node *node = nodeOf(ino);
    struct iovec iov[MEMFS_MAX_IOV];
    int count = 0;
    pthread_rwlock_rdlock(&node->lock);
    if (offset < node->sizeBytes) {
        size_t remaining = size;
        if ((off_t)remaining > node->sizeBytes - offset)
            remaining = (size_t)(node->sizeBytes - offset);
        off_t position = offset;
        while (remaining > 0 && count < (int)MEMFS_MAX_IOV) {
            size_t block = (size_t)(position / MEMFS_BLOCK_BYTES);
            size_t within = (size_t)(position % MEMFS_BLOCK_BYTES);
            size_t piece = MEMFS_BLOCK_BYTES - within;
            if (piece > remaining)
                piece = remaining;
            const char *data = block < node->blockCapacity ? node->blocks[block] : NULL;
            size_t held = data ? blockBytes(node, block) : 0;
            if (within < held) {
                size_t fromData = piece < held - within ? piece : held - within;
                iov[count].iov_base = (void *)(data + within);
                iov[count].iov_len = fromData;
                count++;
                if (fromData < piece && count < (int)MEMFS_MAX_IOV) { /* past a small block's end: zeros */
                    iov[count].iov_base = zeroBlock;
                    iov[count].iov_len = piece - fromData;
                    count++;
                }
            } else {
                iov[count].iov_base = zeroBlock;
                iov[count].iov_len = piece;
                count++;
            }
            position += piece;
            remaining -= piece;
        }
    }
    fuse_reply_iov(req, iov, count); /* copies into the kernel before returning */
    pthread_rwlock_unlock(&node->lock);
}

static int ensureBlocksLocked(struct node *node, size_t blockCount)
{
    if (blockCount <= node->blockCapacity)
        return 0;
    size_t capacity = node->blockCapacity ? node->blockCapacity : 16;
    while (capacity < blockCount)
        capacity *= 2;
    char **blocks = realloc(node->blocks, capacity * sizeof(*blocks));
    if (!blocks)
        return ENOMEM;
    memset(blocks + node->blockCapacity, 0, (capacity - node->blockCapacity) * sizeof(*blocks));
    node->blocks = blocks;
    node->blockCapacity = capacity;
    return 0;
}

/* Copies piece bytes into block index at within, allocating the block first if needed. */
static int writeBlockLocked(struct node *node, size_t index, size_t within, const char *data, size_t piece)
{
    size_t end = within + piece;
    char **slot = &node->blocks[index];
    if (index == 0 && (!*slot || node->smallBytes) && end < MEMFS_BLOCK_BYTES / 2) {
        /* small files grow a malloc'd first block instead of taking a whole pool block */
        if (end > node->smallBytes) {
            size_t capacity = node->smallBytes ? node->smallBytes : MEMFS_SMALL_MIN_BYTES;
            while (capacity < end)
                capacity *= 2;
            char *grown = realloc(*slot, capacity);
            if (!grown)
                return ENOMEM;
            memset(grown + node->smallBytes, 0, capacity - node->smallBytes);
            *slot = grown;
            node->smallBytes = capacity;
        }
    } else if (!*slot || (index == 0 && node->smallBytes)) {
        char *fresh = allocateBlock();
        if (!fresh)
            return ENOMEM;
        size_t kept = index == 0 ? node->smallBytes : 0;
        if (kept) {
            memcpy(fresh, *slot, kept);
            free(*slot);
            node->smallBytes = 0;
        }
        /* bytes no write has covered must read as zeros */
        memset(fresh + kept, 0, MEMFS_BLOCK_BYTES - kept);
        *slot = fresh;
    }
    memcpy(*slot + within, data, piece);
    return 0;
}

static void memfsWrite(fuse_req_t req, fuse_ino_t ino, const char *buffer, size_t size, off_t offset,
                       struct fuse_file_info *fi)
{
    (void)fi;
    struct node *node = nodeOf(ino);
    pthread_rwlock_wrlock(&node->lock);
    off_t end = offset + (off_t)size;
    int error = ensureBlocksLocked(node, (size_t)((end + MEMFS_BLOCK_BYTES - 1) / MEMFS_BLOCK_BYTES));
    size_t done = 0;
    while (!error && done < size) {
        off_t position = offset + (off_t)done;
        size_t block = (size_t)(position / MEMFS_BLOCK_BYTES);
        size_t within = (size_t)(position % MEMFS_BLOCK_BYTES);
        size_t piece = MEMFS_BLOCK_BYTES - within;
        if (piece > size - done)
            piece = size - done;
        if ((error = writeBlockLocked(node, block, within, buffer + done, piece)) != 0)
            break;
        done += piece;
    }
    if (done > 0) {
        if (offset + (off_t)done > node->sizeBytes)
            node->sizeBytes = offset + (off_t)done;
        clock_gettime(CLOCK_REALTIME, &node->mtime);
        node->ctime = node->mtime;
    }
    pthread_rwlock_unlock(&node->lock);
    if (done > 0)
        fuse_reply_write(req, done);
    else
        fuse_reply_err(req, error ? error : EIO);
}

static void memfsFsync(fuse_req_t req, fuse_ino_t ino, int dataOnly, struct fuse_file_info *fi)
{
    (void)ino, (void)dataOnly, (void)fi;
    fuse_reply_err(req, 0); /* memory is the medium: nothing to make durable */
}

static void memfsFlush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino, (void)fi;
    fuse_reply_err(req, 0);
}

/* A directory listing taken at opendir, so that concurrent changes cannot shift offsets. */
struct listing {
    size_t count;
    struct listingEntry {
        fuse_ino_t ino;
        mode_t mode;
        char *name;
    } entries[];
};

static void memfsOpendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct node *dir = nodeOf(ino);
    if (!S_ISDIR(dir->mode)) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    pthread_mutex_lock(&namespaceLock);
    size_t count = dir->childCount + 2;
    struct listing *listing = malloc(sizeof(*listing) + count * sizeof(listing->entries[0]));
    if (!listing) {
        pthread_mutex_unlock(&namespaceLock);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    listing->count = 0;
    struct node *parent = dir->dotdot ? dir->dotdot : dir;
    listing->entries[listing->count++] = (struct listingEntry){inoOf(dir), S_IFDIR, strdup(".")};
    listing->entries[listing->count++] = (struct listingEntry){inoOf(parent), S_IFDIR, strdup("..")};
    for (struct dentry *entry = dir->children; entry; entry = entry->siblingNext)
        listing->entries[listing->count++] =
            (struct listingEntry){inoOf(entry->child), entry->child->mode, strdup(entry->name)};
    pthread_mutex_unlock(&namespaceLock);
    fi->fh = (uint64_t)(uintptr_t)listing;
    fuse_reply_open(req, fi);
}

static void memfsReaddir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, struct fuse_file_info *fi)
{
    (void)ino;
    struct listing *listing = (struct listing *)(uintptr_t)fi->fh;
    char *buffer = malloc(size);
    if (!buffer) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    size_t used = 0;
    for (size_t i = (size_t)offset; i < listing->count; i++) {
        struct stat st = {.st_ino = listing->entries[i].ino, .st_mode = listing->entries[i].mode};
        size_t need = fuse_add_direntry(req, buffer + used, size - used, listing->entries[i].name, &st, (off_t)(i + 1));
        if (need > size - used)
            break;
        used += need;
    }
    fuse_reply_buf(req, buffer, used);
    free(buffer);
}

static void memfsReleasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    struct listing *listing = (struct listing *)(uintptr_t)fi->fh;
    for (size_t i = 0; i < listing->count; i++)
        free(listing->entries[i].name);
    free(listing);
    fuse_reply_err(req, 0);
}

static void memfsStatfs(fuse_req_t req, fuse_ino_t ino)
{
    (void)ino;
    struct statvfs st;
    memset(&st, 0, sizeof(st));
    st.f_bsize = MEMFS_BLOCK_BYTES;
    st.f_frsize = 4096;
    long pages = sysconf(_SC_PHYS_PAGES), pageBytes = sysconf(_SC_PAGESIZE);
    st.f_blocks = (fsblkcnt_t)pages * (fsblkcnt_t)pageBytes / st.f_frsize;
    st.f_bfree = st.f_bavail = st.f_blocks / 2;
    st.f_files = 1u << 30;
    pthread_mutex_lock(&namespaceLock);
    st.f_ffree = st.f_favail = st.f_files - hashCount;
    pthread_mutex_unlock(&namespaceLock);
    st.f_namemax = NAME_MAX;
    fuse_reply_statfs(req, &st);
}

static void memfsInit(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    conn->max_write = MEMFS_MAX_IO_BYTES;
    conn->max_read = MEMFS_MAX_IO_BYTES; /* must equal the max_read mount option main() adds */
    conn->max_readahead = MEMFS_MAX_IO_BYTES;
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS)
        conn->want |= FUSE_CAP_PARALLEL_DIROPS;
}

static const struct fuse_lowlevel_ops memfsOps = {
    .init = memfsInit,
    .lookup = memfsLookup,
    .forget = memfsForget,
    .forget_multi = memfsForgetMulti,
    .getattr = memfsGetattr,
    .setattr = memfsSetattr,
    .mknod = memfsMknod,
    .mkdir = memfsMkdir,
    .unlink = memfsUnlink,
    .rmdir = memfsRmdir,
    .rename = memfsRename,
    .open = memfsOpen,
    .read = memfsRead,
    .write = memfsWrite,
    .flush = memfsFlush,
    .fsync = memfsFsync,
    .opendir = memfsOpendir,
    .readdir = memfsReaddir,
    .releasedir = memfsReleasedir,
    .statfs = memfsStatfs,
    .create = memfsCreate,
};

int main(int argc, char *argv[])
{
    /* our one option, taken out before libfuse parses the rest */
    size_t prefaultMegabytes = 0;
    int kept = 1;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--prefault-mb=", 14) == 0)
            prefaultMegabytes = strtoull(argv[i] + 14, NULL, 10);
        else
            argv[kept++] = argv[i];
    }
    argc = kept;
    argv[argc] = NULL;
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct fuse_cmdline_opts opts;
    if (fuse_parse_cmdline(&args, &opts) != 0)
        return 1;
    char maxReadOption[64];
    snprintf(maxReadOption, sizeof(maxReadOption), "-omax_read=%u", MEMFS_MAX_IO_BYTES);
    if (fuse_opt_add_arg(&args, maxReadOption) != 0)
        return 1;
    if (opts.show_help || !opts.mountpoint) {
        printf("usage: %s MOUNTPOINT [-f] [-s] [-o OPTION,...] [--prefault-mb=N]\n", argv[0]);
        fuse_cmdline_help();
        fuse_lowlevel_help();
        return opts.show_help ? 0 : 1;
    }
    hashTable = calloc(hashBuckets, sizeof(*hashTable));
    rootNode = newNode(S_IFDIR | 0755, NULL);
    if (!hashTable || !rootNode)
        return 1;
    rootNode->lookupCount = 1;
    if (prefaultMegabytes && prefaultPool(prefaultMegabytes * (1u << 20) / MEMFS_BLOCK_BYTES) != 0) {
        fprintf(stderr, "memfs: cannot prefault %zu MiB\n", prefaultMegabytes);
        return 1;
    }

    int status = 1;
    struct fuse_session *session = fuse_session_new(&args, &memfsOps, sizeof(memfsOps), NULL);
    if (!session)
        goto out;
    if (fuse_set_signal_handlers(session) != 0)
        goto destroy;
    if (fuse_session_mount(session, opts.mountpoint) != 0)
        goto handlers;
    fuse_daemonize(opts.foreground);
    if (opts.singlethread) {
        status = fuse_session_loop(session);
    } else {
        struct fuse_loop_config *config = fuse_loop_cfg_create();
        fuse_loop_cfg_set_clone_fd(config, (unsigned)opts.clone_fd);
        fuse_loop_cfg_set_max_threads(config, opts.max_threads);
        status = fuse_session_loop_mt(session, config);
        fuse_loop_cfg_destroy(config);
    }
    fuse_session_unmount(session);
handlers:
    fuse_remove_signal_handlers(session);
destroy:
    fuse_session_destroy(session);
out:
    free(opts.mountpoint);
    fuse_opt_free_args(&args);
    return status ? 1 : 0;
}
