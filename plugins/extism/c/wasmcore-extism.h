/* wasmcore-extism.h -- the `extism:host/env` imports for C plugins, written for wasm-core.
 *
 * Our own header (not the Extism C PDK's `extism-pdk.h`, which is not reachable offline): it
 * declares the Extism kernel functions with the signatures of Extism's ABI, so a plugin built
 * with it runs on any Extism host (the Extism SDKs) and on wasm-core. Memory handles are
 * 64-bit offsets into the kernel's memory, not pointers into the plugin's memory: bytes move
 * between the two with load/store calls (see extism_copy_in / extism_copy_out below).
 *
 * Portability: Extism's own runtime frees the key block given to config_get, var_get and
 * var_set; allocate a fresh key for every call (wasm-core does not free it, either way works).
 */
#ifndef WASMCORE_EXTISM_H
#define WASMCORE_EXTISM_H

#include <stdint.h>

typedef uint64_t ExtismHandle;

#define EXTISM_ENV(name) __attribute__((import_module("extism:host/env"), import_name(name)))
#define EXTISM_USER(name) __attribute__((import_module("extism:host/user"), import_name(name)))
#define EXTISM_EXPORT(name) __attribute__((export_name(name)))

EXTISM_ENV("input_length") uint64_t extism_input_length(void);
EXTISM_ENV("input_load_u8") uint8_t extism_input_load_u8(uint64_t index);
EXTISM_ENV("input_load_u64") uint64_t extism_input_load_u64(uint64_t index);
EXTISM_ENV("alloc") ExtismHandle extism_alloc(uint64_t length);
EXTISM_ENV("free") void extism_free(ExtismHandle block);
EXTISM_ENV("length") uint64_t extism_length(ExtismHandle block);
EXTISM_ENV("load_u8") uint8_t extism_load_u8(ExtismHandle offset);
EXTISM_ENV("load_u64") uint64_t extism_load_u64(ExtismHandle offset);
EXTISM_ENV("store_u8") void extism_store_u8(ExtismHandle offset, uint8_t value);
EXTISM_ENV("store_u64") void extism_store_u64(ExtismHandle offset, uint64_t value);
EXTISM_ENV("output_set") void extism_output_set(ExtismHandle block, uint64_t length);
EXTISM_ENV("error_set") void extism_error_set(ExtismHandle block);
EXTISM_ENV("error_get") ExtismHandle extism_error_get(void);
EXTISM_ENV("config_get") ExtismHandle extism_config_get(ExtismHandle key);
EXTISM_ENV("var_get") ExtismHandle extism_var_get(ExtismHandle key);
EXTISM_ENV("var_set") void extism_var_set(ExtismHandle key, ExtismHandle value);
EXTISM_ENV("http_request") ExtismHandle extism_http_request(ExtismHandle request,
                                                            ExtismHandle body);
EXTISM_ENV("log_info") void extism_log_info(ExtismHandle message);
EXTISM_ENV("log_debug") void extism_log_debug(ExtismHandle message);
EXTISM_ENV("log_warn") void extism_log_warn(ExtismHandle message);
EXTISM_ENV("log_error") void extism_log_error(ExtismHandle message);

/* Copy `n` bytes of plugin memory into kernel memory at `dst`, 8 bytes per call. */
static inline void extism_copy_in(ExtismHandle dst, const void *src, uint64_t n) {
  const uint8_t *s = (const uint8_t *)src;
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t word;
    __builtin_memcpy(&word, s + i, 8);
    extism_store_u64(dst + i, word);
  }
  for (; i < n; i++) extism_store_u8(dst + i, s[i]);
}

/* Copy `n` bytes of kernel memory at `src` into plugin memory. */
static inline void extism_copy_out(void *dst, ExtismHandle src, uint64_t n) {
  uint8_t *d = (uint8_t *)dst;
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t word = extism_load_u64(src + i);
    __builtin_memcpy(d + i, &word, 8);
  }
  for (; i < n; i++) d[i] = extism_load_u8(src + i);
}

/* Copy up to `cap` bytes of the input into `dst`; returns the input's full length. */
static inline uint64_t extism_input(void *dst, uint64_t cap) {
  uint64_t n = extism_input_length();
  uint8_t *d = (uint8_t *)dst;
  uint64_t m = n < cap ? n : cap, i = 0;
  for (; i + 8 <= m; i += 8) {
    uint64_t word = extism_input_load_u64(i);
    __builtin_memcpy(d + i, &word, 8);
  }
  for (; i < m; i++) d[i] = extism_input_load_u8(i);
  return n;
}

/* A new kernel block holding `n` bytes of plugin memory. */
static inline ExtismHandle extism_block(const void *src, uint64_t n) {
  ExtismHandle block = extism_alloc(n);
  extism_copy_in(block, src, n);
  return block;
}

/* Set the output to `n` bytes of plugin memory. */
static inline void extism_output(const void *src, uint64_t n) {
  extism_output_set(extism_block(src, n), n);
}

#endif
