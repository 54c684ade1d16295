// Socket calls Swift's Glibc module does not export (they need _GNU_SOURCE).
#define _GNU_SOURCE
#include "weft_support.h"
#include <sys/socket.h>

int weft_accept_cloexec(int listener) {
    return accept4(listener, NULL, NULL, SOCK_CLOEXEC);
}
