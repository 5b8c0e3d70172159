#include "hrhf_memory.h"

#if defined(__GLIBC__)
#include <malloc.h>

void hrhf_keep_freed_memory(void) {
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
}
#else
void hrhf_keep_freed_memory(void) {}
#endif
