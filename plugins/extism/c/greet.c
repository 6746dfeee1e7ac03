/* greet.c -- an Extism plugin in C (built with wasmcore-extism.h; see ../build.sh).
 *
 *   greet:  output "<greeting>, <input>!" where greeting is config "greeting" (default
 *           "Hello"); logs one info line.
 *   fail:   error_set("the input was refused: <input>") and status 1.
 *   count:  var "n" counts the input's bytes one var_set at a time (vars live for one
 *           execution, so it always starts from 0); output the final count in decimal.
 *   spin:   loops forever (stopped by the execution's time limit).
 *   fetch:  calls http_request (refused by wasm-core).
 *   crash:  traps (unreachable).
 *   hoard:  allocates 1 MiB kernel blocks until the memory limit stops it.
 */
#include "wasmcore-extism.h"

#define CAP 4096
static uint8_t buf[CAP + 64];

static uint64_t slen(const char *s) {
  uint64_t n = 0;
  while (s[n]) n++;
  return n;
}

static ExtismHandle cstr(const char *s) { return extism_block(s, slen(s)); }

static void log_info(const char *s) {
  ExtismHandle m = cstr(s);
  extism_log_info(m);
  extism_free(m);
}

EXTISM_EXPORT("greet") int32_t greet(void) {
  uint64_t n = 0, len;
  ExtismHandle value = extism_config_get(cstr("greeting"));
  if (value) {
    len = extism_length(value);
    if (len > 1024) len = 1024;
    extism_copy_out(buf, value, len);
    n = len;
  } else {
    __builtin_memcpy(buf, "Hello", 5);
    n = 5;
  }
  buf[n++] = ',';
  buf[n++] = ' ';
  len = extism_input(buf + n, CAP - n - 1);
  n += len < CAP - n - 1 ? len : CAP - n - 1;
  buf[n++] = '!';
  log_info("greet: greeting built");
  extism_output(buf, n);
  return 0;
}

EXTISM_EXPORT("fail") int32_t fail(void) {
  static const char prefix[] = "the input was refused: ";
  uint64_t n = sizeof prefix - 1, len;
  __builtin_memcpy(buf, prefix, n);
  len = extism_input(buf + n, CAP - n);
  n += len < CAP - n ? len : CAP - n;
  extism_log_warn(cstr("fail: refusing"));
  extism_error_set(extism_block(buf, n));
  return 1;
}

/* A fresh key block for every var call: Extism's own runtime frees the key it is given. */
EXTISM_EXPORT("count") int32_t count(void) {
  uint64_t total = extism_input_length(), i;
  for (i = 0; i < total; i++) {
    uint64_t current = 0;
    ExtismHandle v = extism_var_get(cstr("n"));
    if (v) current = extism_load_u64(v);
    current += 1;
    ExtismHandle nv = extism_alloc(8);
    extism_store_u64(nv, current);
    extism_var_set(cstr("n"), nv);
  }
  uint64_t result = 0;
  ExtismHandle v = extism_var_get(cstr("n"));
  if (v) result = extism_load_u64(v);
  char digits[24];
  int d = 0;
  do { digits[d++] = (char)('0' + result % 10); result /= 10; } while (result);
  for (int k = 0; k < d; k++) buf[k] = (uint8_t)digits[d - 1 - k];
  extism_output(buf, (uint64_t)d);
  return 0;
}

EXTISM_EXPORT("spin") int32_t spin(void) {
  volatile uint64_t x = 0;
  for (;;) x++;
  return 0;
}

EXTISM_EXPORT("fetch") int32_t fetch(void) {
  ExtismHandle response = extism_http_request(cstr("{\"url\": \"https://example.com\"}"), 0);
  extism_output_set(response, extism_length(response));
  return 0;
}

EXTISM_EXPORT("crash") int32_t crash(void) {
  __builtin_trap();
}

EXTISM_EXPORT("hoard") int32_t hoard(void) {
  for (;;) extism_alloc(1 << 20);
  return 0;
}
