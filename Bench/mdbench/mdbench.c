/*
 * mdbench: metadata and small-file micro-benchmark for Weft's Bench/run.
 *
 * Runs one phase over a tree of files and prints one JSON object on stdout:
 *   {"phase":..., "ops":..., "seconds":..., "ops_per_sec":..., "bytes":..., "mib_per_sec":...}
 * Only the phase's loop is timed; making and removing the directories is not.
 *
 * Phases (file i lives in DIR/dNNN/fNNNNNNN with NNN = i % dirs):
 *   create      open(O_CREAT|O_EXCL|O_WRONLY) + close, one per file (makes the directories first)
 *   stat        stat() of every file
 *   unlink      unlink() of every file (then removes the directories)
 *   smallwrite  create + write SIZE bytes + close, one per file (makes the directories first)
 *   smallread   open + read to EOF + close, one per file; checks the size read
 *   fsyncappend append SIZE bytes + fsync to DIR/appendfile, COUNT times (one thread)
 *   fsyncoverwrite  write COUNT x SIZE bytes to DIR/overwritefile and fsync them (not timed),
 *               then overwrite them in order, SIZE bytes + fdatasync at a time (timed): a sync
 *               that writes data only (no new size, no new blocks), as a write-ahead log over
 *               blocks it wrote before (Weft's metadata journal) pays
 *   handoff     COUNT round trips between two threads through a mutex and condition variable
 *               (DIR unused): what one hand-off between threads costs on this machine, the
 *               step every request pays between a FUSE thread, a client's event loop and a
 *               server's worker
 *
 * Threads: file i is handled by thread i % threads, so with dirs a multiple of
 * threads every thread works in its own directories.
 *
 * Limits: files <= 100,000,000, dirs <= 1000, threads <= 64, size <= 16 MiB.
 * Any failed system call stops the run with a message naming the path and errno.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_FILES 100000000L
#define MAX_DIRS 1000L
#define MAX_THREADS 64L
#define MAX_SIZE_BYTES (16L << 20)
#define PATH_BYTES 4096

enum phase { CREATE, STAT, UNLINK, SMALLWRITE, SMALLREAD, FSYNCAPPEND, HANDOFF, FSYNCOVERWRITE };
static const char *phaseNames[] = {"create", "stat", "unlink", "smallwrite", "smallread", "fsyncappend", "handoff",
                                   "fsyncoverwrite"};

static enum phase phase;
static const char *rootDir;
static long fileCount = 10000, dirCount = 1, threadCount = 1, sizeBytes = 4096, appendCount = 2000;

struct worker {
    pthread_t thread;
    long index;
    long long bytes;
};

static void die(const char *what, const char *path)
{
    fprintf(stderr, "mdbench %s: %s %s: %s\n", phaseNames[phase], what, path, strerror(errno));
    exit(1);
}

static void filePath(char *buffer, long i)
{
    snprintf(buffer, PATH_BYTES, "%s/d%03ld/f%07ld", rootDir, i % dirCount, i);
}

static void dirPath(char *buffer, long d)
{
    snprintf(buffer, PATH_BYTES, "%s/d%03ld", rootDir, d);
}

static double nowSeconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *runWorker(void *argument)
{
    struct worker *self = argument;
    char path[PATH_BYTES];
    char *buffer = malloc((size_t)sizeBytes + 1);
    if (!buffer)
        die("malloc", "");
    memset(buffer, 'w', (size_t)sizeBytes);
    for (long i = self->index; i < fileCount; i += threadCount) {
        filePath(path, i);
        struct stat st;
        int fd;
        switch (phase) {
        case CREATE:
            if ((fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0644)) < 0)
                die("open", path);
            if (close(fd) != 0)
                die("close", path);
            break;
        case STAT:
            if (stat(path, &st) != 0)
                die("stat", path);
            break;
        case UNLINK:
            if (unlink(path) != 0)
                die("unlink", path);
            break;
        case SMALLWRITE:
            if ((fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0644)) < 0)
                die("open", path);
            if (write(fd, buffer, (size_t)sizeBytes) != sizeBytes)
                die("write", path);
            if (close(fd) != 0)
                die("close", path);
            self->bytes += sizeBytes;
            break;
        case SMALLREAD: {
            if ((fd = open(path, O_RDONLY)) < 0)
                die("open", path);
            long long total = 0;
            ssize_t got;
            while ((got = read(fd, buffer, (size_t)sizeBytes + 1)) > 0)
                total += got;
            if (got < 0)
                die("read", path);
            if (total != sizeBytes) {
                errno = EIO;
                fprintf(stderr, "mdbench smallread: %s has %lld bytes, expected %ld\n", path, total, sizeBytes);
                exit(1);
            }
            if (close(fd) != 0)
                die("close", path);
            self->bytes += total;
            break;
        }
        case FSYNCAPPEND:
        case FSYNCOVERWRITE:
        case HANDOFF:
            break;
        }
    }
    free(buffer);
    return NULL;
}

static void makeDirs(void)
{
    char path[PATH_BYTES];
    for (long d = 0; d < dirCount && d < fileCount; d++) {
        dirPath(path, d);
        if (mkdir(path, 0755) != 0 && errno != EEXIST)
            die("mkdir", path);
    }
}

static void removeDirs(void)
{
    char path[PATH_BYTES];
    for (long d = 0; d < dirCount && d < fileCount; d++) {
        dirPath(path, d);
        if (rmdir(path) != 0 && errno != ENOENT)
            die("rmdir", path);
    }
}

/* Hand-off: the main thread passes a turn to a second thread and waits for it back. */
static pthread_mutex_t handoffLock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t handoffChanged = PTHREAD_COND_INITIALIZER;
static long handoffTurn; /* even: the main thread's turn; odd: the other's */

static void *runHandoffPartner(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&handoffLock);
    for (long round = 0; round < appendCount; round++) {
        while (handoffTurn % 2 == 0)
            pthread_cond_wait(&handoffChanged, &handoffLock);
        handoffTurn++;
        pthread_cond_signal(&handoffChanged);
    }
    pthread_mutex_unlock(&handoffLock);
    return NULL;
}

static void runHandoff(void)
{
    pthread_t partner;
    if (pthread_create(&partner, NULL, runHandoffPartner, NULL) != 0)
        die("pthread_create", "");
    pthread_mutex_lock(&handoffLock);
    for (long round = 0; round < appendCount; round++) {
        handoffTurn++;
        pthread_cond_signal(&handoffChanged);
        while (handoffTurn % 2 == 1)
            pthread_cond_wait(&handoffChanged, &handoffLock);
    }
    pthread_mutex_unlock(&handoffLock);
    pthread_join(partner, NULL);
}

/* Appends sizeBytes + fsync appendCount times; returns bytes written. */
static long long runFsyncAppend(void)
{
    char path[PATH_BYTES];
    snprintf(path, sizeof(path), "%s/appendfile", rootDir);
    char *buffer = malloc((size_t)sizeBytes);
    if (!buffer)
        die("malloc", "");
    memset(buffer, 'a', (size_t)sizeBytes);
    int fd = open(path, O_CREAT | O_WRONLY | O_APPEND | O_TRUNC, 0644);
    if (fd < 0)
        die("open", path);
    for (long i = 0; i < appendCount; i++) {
        if (write(fd, buffer, (size_t)sizeBytes) != sizeBytes)
            die("write", path);
        if (fsync(fd) != 0)
            die("fsync", path);
    }
    if (close(fd) != 0)
        die("close", path);
    free(buffer);
    return (long long)appendCount * sizeBytes;
}

/* Writes and syncs appendCount x sizeBytes, then overwrites them with fdatasync after each
 * write, timing only the overwrites; returns bytes overwritten. */
static long long runFsyncOverwrite(double *seconds)
{
    char path[PATH_BYTES];
    snprintf(path, sizeof(path), "%s/overwritefile", rootDir);
    char *buffer = malloc((size_t)sizeBytes);
    if (!buffer)
        die("malloc", "");
    memset(buffer, 'o', (size_t)sizeBytes);
    int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (fd < 0)
        die("open", path);
    for (long i = 0; i < appendCount; i++)
        if (write(fd, buffer, (size_t)sizeBytes) != sizeBytes)
            die("write", path);
    if (fsync(fd) != 0)
        die("fsync", path);
    double start = nowSeconds();
    for (long i = 0; i < appendCount; i++) {
        if (pwrite(fd, buffer, (size_t)sizeBytes, (off_t)i * sizeBytes) != sizeBytes)
            die("pwrite", path);
        if (fdatasync(fd) != 0)
            die("fdatasync", path);
    }
    *seconds = nowSeconds() - start;
    if (close(fd) != 0)
        die("close", path);
    if (unlink(path) != 0)
        die("unlink", path);
    free(buffer);
    return (long long)appendCount * sizeBytes;
}

static void usage(const char *program)
{
    fprintf(stderr,
            "usage: %s PHASE DIR [--files N] [--dirs N] [--threads N] [--size BYTES] [--count N]\n"
            "  PHASE: create | stat | unlink | smallwrite | smallread | fsyncappend | fsyncoverwrite | handoff\n",
            program);
    exit(2);
}

static long parseBounded(const char *text, const char *name, long low, long high)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || *end || value < low || value > high) {
        fprintf(stderr, "mdbench: --%s must be an integer in [%ld, %ld], got '%s'\n", name, low, high, text);
        exit(2);
    }
    return value;
}

int main(int argc, char *argv[])
{
    static const struct option options[] = {
        {"files", required_argument, NULL, 'f'}, {"dirs", required_argument, NULL, 'd'},
        {"threads", required_argument, NULL, 't'}, {"size", required_argument, NULL, 's'},
        {"count", required_argument, NULL, 'c'}, {NULL, 0, NULL, 0},
    };
    int option;
    while ((option = getopt_long(argc, argv, "f:d:t:s:c:", options, NULL)) != -1) {
        switch (option) {
        case 'f': fileCount = parseBounded(optarg, "files", 1, MAX_FILES); break;
        case 'd': dirCount = parseBounded(optarg, "dirs", 1, MAX_DIRS); break;
        case 't': threadCount = parseBounded(optarg, "threads", 1, MAX_THREADS); break;
        case 's': sizeBytes = parseBounded(optarg, "size", 1, MAX_SIZE_BYTES); break;
        case 'c': appendCount = parseBounded(optarg, "count", 1, MAX_FILES); break;
        default: usage(argv[0]);
        }
    }
    if (argc - optind != 2)
        usage(argv[0]);
    int found = 0;
    for (size_t p = 0; p < sizeof(phaseNames) / sizeof(phaseNames[0]); p++)
        if (strcmp(argv[optind], phaseNames[p]) == 0) {
            phase = (enum phase)p;
            found = 1;
        }
    if (!found)
        usage(argv[0]);
    rootDir = argv[optind + 1];

    long long bytes = 0;
    long ops;
    double seconds;
    if (phase == HANDOFF) {
        double start = nowSeconds();
        runHandoff();
        seconds = nowSeconds() - start;
        ops = appendCount;
    } else if (phase == FSYNCOVERWRITE) {
        bytes = runFsyncOverwrite(&seconds);
        ops = appendCount;
    } else if (phase == FSYNCAPPEND) {
        double start = nowSeconds();
        bytes = runFsyncAppend();
        seconds = nowSeconds() - start;
        ops = appendCount;
    } else {
        if (phase == CREATE || phase == SMALLWRITE)
            makeDirs();
        struct worker workers[MAX_THREADS];
        double start = nowSeconds();
        for (long t = 0; t < threadCount; t++) {
            workers[t] = (struct worker){.index = t};
            if (pthread_create(&workers[t].thread, NULL, runWorker, &workers[t]) != 0)
                die("pthread_create", "");
        }
        for (long t = 0; t < threadCount; t++) {
            pthread_join(workers[t].thread, NULL);
            bytes += workers[t].bytes;
        }
        seconds = nowSeconds() - start;
        ops = fileCount;
        if (phase == UNLINK)
            removeDirs();
    }
    if (seconds <= 0)
        seconds = 1e-9;
    printf("{\"phase\":\"%s\",\"ops\":%ld,\"threads\":%ld,\"dirs\":%ld,\"seconds\":%.6f,"
           "\"ops_per_sec\":%.1f,\"bytes\":%lld,\"mib_per_sec\":%.2f}\n",
           phaseNames[phase], ops, phase == FSYNCAPPEND || phase == FSYNCOVERWRITE ? 1 : phase == HANDOFF ? 2 : threadCount, dirCount, seconds,
           (double)ops / seconds, bytes, (double)bytes / 1048576.0 / seconds);
    return 0;
}
