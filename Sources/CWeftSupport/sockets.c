// Socket calls Swift's Glibc module does not export (they need _GNU_SOURCE).
#define _GNU_SOURCE
#include "weft_support.h"
#include <sys/socket.h>

int weft_accept_cloexec(int listener) {
    return accept4(listener, NULL, NULL, SOCK_CLOEXEC);
}

// epoll for the hub's reading threads (SPEC.md §4, Serving threads). Swift's Glibc module
// imports `struct epoll_event` packed, which Swift cannot lay out: these take its fields apart.
#include <sys/epoll.h>
#include <sys/eventfd.h>

int weft_epoll_create(void) {
    return epoll_create1(EPOLL_CLOEXEC);
}

static int weft_epoll_control(int epoll, int operation, int descriptor, uint64_t key, uint32_t events) {
    struct epoll_event event = { .events = events, .data.u64 = key };
    return epoll_ctl(epoll, operation, descriptor, &event);
}

int weft_epoll_add_oneshot(int epoll, int descriptor, uint64_t key) {
    return weft_epoll_control(epoll, EPOLL_CTL_ADD, descriptor, key, EPOLLIN | EPOLLRDHUP | EPOLLONESHOT);
}

int weft_epoll_rearm_oneshot(int epoll, int descriptor, uint64_t key) {
    return weft_epoll_control(epoll, EPOLL_CTL_MOD, descriptor, key, EPOLLIN | EPOLLRDHUP | EPOLLONESHOT);
}

int weft_epoll_add_level(int epoll, int descriptor, uint64_t key) {
    return weft_epoll_control(epoll, EPOLL_CTL_ADD, descriptor, key, EPOLLIN);
}

int weft_epoll_remove(int epoll, int descriptor) {
    struct epoll_event unused = { 0 };
    return epoll_ctl(epoll, EPOLL_CTL_DEL, descriptor, &unused);
}

int weft_epoll_wait_one(int epoll, int timeout_ms, uint64_t *key) {
    struct epoll_event event;
    int count = epoll_wait(epoll, &event, 1, timeout_ms);
    if (count == 1) *key = event.data.u64;
    return count;
}

int weft_eventfd(void) {
    return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

// -- Co-located reads (SPEC.md §4): abstract Unix sockets and descriptor passing -------------

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

// A new Unix stream socket and the address of the abstract name `name` (no leading NUL) in
// `address`, whose length goes to `length`; -1 with errno (ENAMETOOLONG: the name does not fit).
static int weft_abstract_socket(const char *name, struct sockaddr_un *address, socklen_t *length) {
    size_t count = strlen(name);
    if (count == 0 || count + 1 > sizeof(address->sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memset(address, 0, sizeof(*address));
    address->sun_family = AF_UNIX;
    memcpy(address->sun_path + 1, name, count);
    *length = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + count);
    return socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
}

// Closes `fd`, keeping errno; returns -1.
static int weft_close_failed(int fd) {
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

int weft_listen_abstract(const char *name, int backlog) {
    struct sockaddr_un address;
    socklen_t length;
    int fd = weft_abstract_socket(name, &address, &length);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&address, length) != 0 || listen(fd, backlog) != 0) return weft_close_failed(fd);
    return fd;
}

int weft_connect_abstract(const char *name, int timeout_ms) {
    struct sockaddr_un address;
    socklen_t length;
    int fd = weft_abstract_socket(name, &address, &length);
    if (fd < 0) return -1;
    // Bounds the connect (a full backlog would block it for good: SO_SNDTIMEO applies to
    // connect on a Unix socket) and the exchange after it.
    struct timeval limit = { .tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000 };
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit));
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
    int rc;
    do {
        rc = connect(fd, (struct sockaddr *)&address, length);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) return weft_close_failed(fd);
    return fd;
}

int weft_peer_uid(int socket_fd, unsigned int *uid) {
    struct ucred credentials;
    socklen_t length = sizeof(credentials);
    if (getsockopt(socket_fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) != 0) return -1;
    *uid = credentials.uid;
    return 0;
}

/* Room for one descriptor's control message, aligned as a cmsghdr. */
typedef union {
    char buffer[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
} weft_descriptor_control;

/* A message of the one buffer `vector`, with no control data yet. */
static void weft_single_buffer_message(struct msghdr *message, struct iovec *vector) {
    memset(message, 0, sizeof(*message));
    message->msg_iov = vector;
    message->msg_iovlen = 1;
}

long weft_send_with_descriptor(int socket_fd, const void *bytes, size_t count, int descriptor) {
    struct iovec vector = { .iov_base = (void *)bytes, .iov_len = count };
    weft_descriptor_control control;
    memset(&control, 0, sizeof(control));
    struct msghdr message;
    weft_single_buffer_message(&message, &vector);
    if (descriptor >= 0) {
        message.msg_control = control.buffer;
        message.msg_controllen = sizeof(control.buffer);
        struct cmsghdr *header = CMSG_FIRSTHDR(&message);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(header), &descriptor, sizeof(int));
    }
    ssize_t sent;
    do {
        sent = sendmsg(socket_fd, &message, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    return (long)sent;
}

long weft_receive_with_descriptor(int socket_fd, void *bytes, size_t count, int *descriptor) {
    struct iovec vector = { .iov_base = bytes, .iov_len = count };
    weft_descriptor_control control;
    struct msghdr message;
    weft_single_buffer_message(&message, &vector);
    message.msg_control = control.buffer;
    message.msg_controllen = sizeof(control.buffer);
    *descriptor = -1;
    ssize_t received;
    do {
        received = recvmsg(socket_fd, &message, MSG_CMSG_CLOEXEC);
    } while (received < 0 && errno == EINTR);
    if (received < 0) return -1;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header != NULL; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level == SOL_SOCKET && header->cmsg_type == SCM_RIGHTS
            && header->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int passed;
            memcpy(&passed, CMSG_DATA(header), sizeof(int));
            // Only one descriptor is expected; close any others sent along.
            size_t extra = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t index = 1; index < extra; index++) {
                int other;
                memcpy(&other, CMSG_DATA(header) + index * sizeof(int), sizeof(int));
                close(other);
            }
            if (*descriptor >= 0) close(*descriptor);
            *descriptor = passed;
        }
    }
    return (long)received;
}
