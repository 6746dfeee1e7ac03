/* host_call.c -- an Extism plugin calling the operator's host method `echo` through an
 * `extism:host/user` import, built with wasmcore-extism.h (see ../build.sh).
 *
 *   call_echo:  sends the input as the request. The response is the method's JSON response,
 *               or its JSON error ({"error": ...}) when the call failed: an error is passed
 *               on as the plugin's error (status 1), a response becomes the output.
 */
#include "wasmcore-extism.h"

EXTISM_USER("echo") ExtismHandle host_echo(ExtismHandle request);

EXTISM_EXPORT("call_echo") int32_t call_echo(void) {
  static uint8_t buf[4096];
  static const char error_prefix[] = "{\"error\"";
  uint64_t n = extism_input(buf, sizeof buf);
  if (n > sizeof buf) n = sizeof buf;
  ExtismHandle response = host_echo(extism_block(buf, n));
  uint64_t len = extism_length(response);
  uint64_t k = sizeof error_prefix - 1;
  if (len >= k) {
    extism_copy_out(buf, response, k);
    if (__builtin_memcmp(buf, error_prefix, k) == 0) {
      extism_error_set(response);
      return 1;
    }
  }
  extism_output_set(response, len);
  return 0;
}
