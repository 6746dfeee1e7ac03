/* host_call.c -- an Extism plugin calling the operator's host method `echo` through an
 * `extism:host/user` import, built with wasmcore-extism.h (see ../build.sh).
 *
 *   call_echo:  sends the input as the request; outputs the response. When the method fails,
 *               the import returns 0 and error_get() holds the method's error: status 1
 *               passes it on as the plugin's error.
 */
#include "wasmcore-extism.h"

EXTISM_USER("echo") ExtismHandle host_echo(ExtismHandle request);

EXTISM_EXPORT("call_echo") int32_t call_echo(void) {
  static uint8_t buf[4096];
  uint64_t n = extism_input(buf, sizeof buf);
  if (n > sizeof buf) n = sizeof buf;
  ExtismHandle response = host_echo(extism_block(buf, n));
  if (!response) {
    extism_error_set(extism_error_get());
    return 1;
  }
  extism_output_set(response, extism_length(response));
  return 0;
}
