#define _GNU_SOURCE
#include <fcntl.h>
#include "weft_support.h"

int weft_o_direct_flag(void) { return O_DIRECT; }
