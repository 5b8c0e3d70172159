#include <stddef.h>
#include <stdint.h>

// libFuzzer's driver (libclang_rt.fuzzer, linked by -sanitize=fuzzer). SwiftPM names an
// executable's entry point MODULE_main and aliases main to it, so hrhf-fuzz's entry point calls
// the driver itself instead of relying on libFuzzer's own main.
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));
