#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
#include "weft_support.h"

int weft_o_direct_flag(void) { return O_DIRECT; }

/* syncfs(2) needs _GNU_SOURCE, which Swift's Glibc module does not define. */
int weft_syncfs(int fd) { return syncfs(fd); }
