#ifndef HRHF_MEMORY_H
#define HRHF_MEMORY_H

/* Keeps blocks up to 32 MB (glibc's largest mmap threshold) in the heap after free and stops
   trimming the heap below 1 GB, so per-iteration activations are reused instead of being
   returned to the kernel and faulted back in. No-op outside glibc. */
void hrhf_keep_freed_memory(void);

#endif
