#ifndef HRHF_MEMORY_H
#define HRHF_MEMORY_H

/* Keeps freed blocks in the heap (no mmap'd blocks, no trimming below 1 GB), so per-iteration
   activations are reused instead of being returned to the kernel and faulted back in. Returns
   1 when glibc accepted the settings, 0 outside glibc (where it does nothing). */
int hrhf_keep_freed_memory(void);

/* Bytes held by tensor storage now and at most since the last reset (atomic: tensors are
   created and freed on worker threads too). The benchmarks report them beside the process's
   peak resident size, which also counts scratch buffers, the runtime and heap slack. */
void hrhf_tensor_bytes_add(long delta);
long hrhf_tensor_bytes_live(void);
long hrhf_tensor_bytes_peak(void);
void hrhf_tensor_bytes_reset_peak(void);

#endif
