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
