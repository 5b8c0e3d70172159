/* stdlib.h first: it is what defines __GLIBC__, which the test below needs. Without it the
   test was always false and the settings were never applied. */
#include <stdlib.h>
#include "hrhf_memory.h"

#if defined(__GLIBC__)
#include <malloc.h>

int hrhf_keep_freed_memory(void) {
    int applied = mallopt(M_MMAP_THRESHOLD, 32 << 20);
    applied &= mallopt(M_TRIM_THRESHOLD, 1 << 30);
    /* No mmap'd blocks at all: the main thread's larger ones (a batch of 4's 67 MB layer-4
       activations) come from the heap too. Each mmap'd block was faulted in on first use and
       unmapped on free, with a TLB shootdown on the other core (a tenth of an inversion step). */
    applied &= mallopt(M_MMAP_MAX, 0);
    return applied;
}
#else
int hrhf_keep_freed_memory(void) { return 0; }
#endif

static long tensor_bytes_live = 0, tensor_bytes_peak = 0;

void hrhf_tensor_bytes_add(long delta) {
    long now = __atomic_add_fetch(&tensor_bytes_live, delta, __ATOMIC_RELAXED);
    long peak = __atomic_load_n(&tensor_bytes_peak, __ATOMIC_RELAXED);
    while (now > peak &&
           !__atomic_compare_exchange_n(&tensor_bytes_peak, &peak, now, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

long hrhf_tensor_bytes_live(void) { return __atomic_load_n(&tensor_bytes_live, __ATOMIC_RELAXED); }
long hrhf_tensor_bytes_peak(void) { return __atomic_load_n(&tensor_bytes_peak, __ATOMIC_RELAXED); }

void hrhf_tensor_bytes_reset_peak(void) {
    __atomic_store_n(&tensor_bytes_peak, __atomic_load_n(&tensor_bytes_live, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}
