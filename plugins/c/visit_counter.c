// visit_counter.c -- a stateful plugin: counts visits per page in the tenant's key-value
// state. Input: the page's name (1 to 200 bytes, no '"', '\\' or control characters).
// Output: "<page>: <n> visits". Returns 1 for a bad page name, 2 when the host method fails
// (its JSON error is logged). C without libc; imports host.call, host.call_result,
// host.output and host.log.
#include <stdint.h>

#define IMPORT(name) __attribute__((import_module("host"), import_name(name)))
IMPORT("call")        int64_t host_call(const void *name, uint32_t name_len,
                                        const void *request, uint32_t request_len);
IMPORT("call_result") int32_t host_call_result(void *dst, uint32_t dst_len);
IMPORT("output")      void host_output(const void *ptr, uint32_t len);
IMPORT("log")         void host_log(const void *ptr, uint32_t len);

extern unsigned char __heap_base;
static uintptr_t heap_top;

void *alloc(uint32_t len) {
    if (!heap_top) heap_top = (uintptr_t)&__heap_base;
    uintptr_t ptr = (heap_top + 7) & ~(uintptr_t)7;
    uint64_t end = (uint64_t)ptr + len;
    uint64_t have = (uint64_t)__builtin_wasm_memory_size(0) * 65536;
    if (end > have &&
        __builtin_wasm_memory_grow(0, (end - have + 65535) / 65536) == (uintptr_t)-1)
        __builtin_trap();                       // memory cap reached
    heap_top = (uintptr_t)end;
    return (void *)ptr;
}

static uint32_t append(char *dst, uint32_t at, const char *src, uint32_t len) {
    for (uint32_t i = 0; i < len; i++) dst[at + i] = src[i];
    return at + len;
}

#define LIT(s) s, (uint32_t)(sizeof s - 1)

int32_t process(const uint8_t *in, uint32_t in_len, const uint8_t *env, uint32_t env_len) {
    (void)env; (void)env_len;
    if (in_len == 0 || in_len > 200) return 1;
    for (uint32_t i = 0; i < in_len; i++)
        if (in[i] == '"' || in[i] == '\\' || in[i] < 0x20) return 1;

    // kv.incr {"key":"visits:<page>"}: one atomic increment, whichever worker runs it
    char request[256];
    uint32_t n = 0;
    n = append(request, n, LIT("{\"key\":\"visits:"));
    n = append(request, n, (const char *)in, in_len);
    n = append(request, n, LIT("\"}"));
    int64_t got = host_call("kv.incr", 7, request, n);

    uint32_t len = (uint32_t)(got < 0 ? -got : got);
    char *reply = alloc(len);
    host_call_result(reply, len);
    if (got < 0) {                              // {"error":{"code":...,"message":...}}
        host_log(reply, len);
        return 2;
    }

    // {"value":N}: the digits after the colon
    uint64_t visits = 0;
    uint32_t i = 0;
    while (i < len && reply[i] != ':') i++;
    for (i++; i < len && reply[i] >= '0' && reply[i] <= '9'; i++)
        visits = visits * 10 + (uint64_t)(reply[i] - '0');

    char digits[20], out[256];
    uint32_t d = 0;
    do { digits[d++] = (char)('0' + visits % 10); visits /= 10; } while (visits);
    uint32_t o = append(out, 0, (const char *)in, in_len);
    o = append(out, o, LIT(": "));
    while (d) out[o++] = digits[--d];
    o = append(out, o, LIT(" visits"));
    host_output(out, o);
    return 0;
}
