/* One fresh-store execution of a core module in ONE foreign call (sandbox_worker/native.py).
 *
 * Why: the ctypes fast path makes ~18 calls into libwasmtime per execution (0.3 us each) plus
 * a ctypes callback for host.output. Here the whole sequence (store, limits, fuel, epoch
 * deadline, instantiate, export lookups, alloc, copy-in, call, fuel and memory size, store
 * delete) runs in C, and host.output / host.log append to buffers this file owns. Python is
 * called back only for what needs Python: host.call (host methods), host.call_result, and an
 * output sink (large outputs).
 *
 * Nothing is linked at build time: libwasmtime's functions come as addresses from the library
 * wasmtime-py already loaded (fc_init), and the struct layouts below mirror wasmtime-py 50's
 * bindings; fc_layout reports them so Python can refuse this path on any mismatch.
 *
 * On success the store is deleted here. On any failure the store is left alive and Python
 * classifies what happened with the same code as its own path (the trap/error pointers, the
 * memory extern and the instance are where Python reads them), then deletes the store.
 */
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FC_ABI_VERSION 1

/* --- wasmtime C API types (opaque, or layouts as in wasmtime-py 50's _bindings.py) ------ */
typedef struct wasmtime_store wasmtime_store_t;
typedef struct wasmtime_context wasmtime_context_t;
typedef struct wasmtime_error wasmtime_error_t;
typedef struct wasm_trap_t wasm_trap_t;
typedef struct wasmtime_instance_pre wasmtime_instance_pre_t;
typedef struct wasmtime_caller wasmtime_caller_t;
typedef struct wasm_engine_t wasm_engine_t;

typedef struct { uint64_t store_id; size_t private_; } wasmtime_instance_t;
typedef struct { uint64_t store_id; void *private_; } wasmtime_func_t;
typedef struct { struct { uint64_t store_id; uint32_t private1; } a; uint32_t private2; }
    wasmtime_memory_t;
typedef union {
    int32_t i32; int64_t i64; float f32; double f64; uint8_t v128[16]; void *funcref;
} wasmtime_val_raw_t;
typedef struct {
    uint8_t kind;
    union { wasmtime_func_t func; wasmtime_memory_t memory; uint8_t bytes[24]; } of;
} wasmtime_extern_t;
#define WASMTIME_EXTERN_MEMORY 3

typedef wasm_trap_t *(*unchecked_cb)(void *, wasmtime_caller_t *, wasmtime_val_raw_t *, size_t);
typedef wasmtime_error_t *(*deadline_cb)(wasmtime_context_t *, void *, uint64_t *, uint8_t *);

/* --- libwasmtime functions, by address (fc_init, in this order) -------------------------- */
static wasmtime_store_t *(*store_new)(wasm_engine_t *, void *, void (*)(void *));
static wasmtime_context_t *(*store_context)(wasmtime_store_t *);
static void (*store_delete)(wasmtime_store_t *);
static void (*store_limiter)(wasmtime_store_t *, int64_t, int64_t, int64_t, int64_t, int64_t);
static wasmtime_error_t *(*set_fuel)(wasmtime_context_t *, uint64_t);
static wasmtime_error_t *(*get_fuel)(const wasmtime_context_t *, uint64_t *);
static void (*set_epoch_deadline)(wasmtime_context_t *, uint64_t);
static void (*epoch_deadline_callback)(wasmtime_store_t *, deadline_cb, void *, void (*)(void *));
static wasmtime_error_t *(*error_new)(const char *);
static wasmtime_error_t *(*instance_pre_instantiate)(const wasmtime_instance_pre_t *,
                                                     wasmtime_context_t *, wasmtime_instance_t *,
                                                     wasm_trap_t **);
static int (*instance_export_nth)(wasmtime_context_t *, const wasmtime_instance_t *, size_t,
                                  char **, size_t *, wasmtime_extern_t *);
static wasmtime_error_t *(*func_call_unchecked)(wasmtime_context_t *, const wasmtime_func_t *,
                                                wasmtime_val_raw_t *, size_t, wasm_trap_t **);
static uint8_t *(*memory_data)(const wasmtime_context_t *, const wasmtime_memory_t *);
static size_t (*memory_data_size)(const wasmtime_context_t *, const wasmtime_memory_t *);
static int (*caller_export_get)(wasmtime_caller_t *, const char *, size_t, wasmtime_extern_t *);
static wasm_trap_t *(*trap_new)(const char *, size_t);
#define FC_NFUNCS 16

/* Python callbacks (ctypes CFUNCTYPE objects kept alive by native.py). Each returns 0 on
 * success; non-zero means Python recorded the failure (state.failure) and the call traps. */
typedef int (*py_sink_fn)(const uint8_t *addr, size_t len);
typedef int (*py_keep_fn)(const uint8_t *addr, size_t len);
typedef int (*py_call_fn)(const uint8_t *name, size_t name_len, const uint8_t *req,
                          size_t req_len, int64_t *result);
typedef int (*py_call_result_fn)(uint8_t *dst, size_t dst_len, int32_t *copied);

/* --- what Python prepares ---------------------------------------------------------------- */
enum { KIND_ABI = 0, KIND_VOID = 1, KIND_STATUS = 2 };

/* Per module and entry (cached by Python). Indices are -1 when absent. */
typedef struct {
    const wasmtime_instance_pre_t *pre;
    int64_t memory_index, alloc_index, initialize_index, entry_index;
    int64_t kind;
    int64_t verify; /* stop after instantiating (FC_VERIFY): Python checks the export order */
} fc_plan;

/* Per Limits object (cached by Python). */
typedef struct {
    int64_t memory_bytes;
    uint64_t fuel;
    uint64_t output_cap, log_cap;
    uint64_t deadline_ticks;
    int64_t precise_timeout_ns; /* >= 0: a short timeout, checked against the clock */
} fc_limits;

/* Results Python reads after a call (fc_state's public head: keep in sync with native.py). */
enum {
    FC_OK = 0, FC_CODE = 1, FC_FAILED = 2, FC_VERIFY = 3,
    /* flags on FC_OK, so that the common case reads no field it does not need */
    FC_OK_LOGS = 16, FC_OK_TRUNCATED = 32, FC_OK_SINK = 64, FC_OK_KEPT = 128
};
enum {
    STAGE_NONE = 0, STAGE_SETUP = 1, STAGE_INSTANTIATE = 2, STAGE_EXPORT = 3,
    STAGE_INITIALIZE = 4, STAGE_ALLOC_INPUT = 5, STAGE_PLACE_INPUT = 6, STAGE_ALLOC_ENV = 7,
    STAGE_PLACE_ENV = 8, STAGE_CALL = 9
};

typedef struct {
    /* results */
    uint64_t fuel_left, memory_size;
    int64_t code, stage, missing_index;
    uint64_t alloc_ptr, alloc_len;
    wasmtime_error_t *error;
    wasm_trap_t *trap;
    wasmtime_store_t *store;
    wasmtime_context_t *ctx;
    uint8_t *out_buf;
    uint64_t out_len, out_total, out_capacity;
    uint8_t *log_buf;
    uint64_t log_used, log_count, log_len;
    uint8_t has_memory, sink_active, output_limit, logs_truncated, timed_out, kept, pad[2];
    /* set once */
    wasm_engine_t *engine;
    wasmtime_instance_t *instance;  /* Python's InstanceSlot */
    wasmtime_extern_t *memory;      /* Python's HostState memory extern */
    py_sink_fn py_sink;
    py_keep_fn py_keep; /* output pieces past out_buf's capacity, kept by Python */
    py_call_fn py_call;
    py_call_result_fn py_call_result;
    /* private */
    uint64_t log_cap_alloc;
    const fc_limits *limits;
    uint64_t sink_threshold; /* UINT64_MAX: no output sink for this execution */
    int64_t deadline_ns;
    wasmtime_extern_t func;
    wasmtime_val_raw_t args[4];
} fc_state;

#ifndef FC_SOURCE_SHA256
#define FC_SOURCE_SHA256 "unknown"
#endif

int fc_version(void) { return FC_ABI_VERSION; }

/* The sha256 of the fastcall.c it was built from (build.sh): a test catches a stale build. */
const char *fc_source_sha256(void) { return FC_SOURCE_SHA256; }

/* sizes and offsets this file assumes, for Python to compare with wasmtime-py's and its own */
void fc_layout(int64_t *out) {
    out[0] = sizeof(wasmtime_extern_t);
    out[1] = offsetof(wasmtime_extern_t, of);
    out[2] = sizeof(wasmtime_instance_t);
    out[3] = sizeof(wasmtime_val_raw_t);
    out[4] = sizeof(wasmtime_memory_t);
    out[5] = sizeof(wasmtime_func_t);
    out[6] = WASMTIME_EXTERN_MEMORY;
    out[7] = sizeof(fc_state);
    out[8] = offsetof(fc_state, engine);
    out[9] = sizeof(fc_plan);
    out[10] = sizeof(fc_limits);
}

int fc_init(void *const *funcs, size_t n) {
    if (n != FC_NFUNCS) return -1;
    for (size_t i = 0; i < n; i++)
        if (!funcs[i]) return -1;
    store_new = funcs[0];
    store_context = funcs[1];
    store_delete = funcs[2];
    store_limiter = funcs[3];
    set_fuel = funcs[4];
    get_fuel = funcs[5];
    set_epoch_deadline = funcs[6];
    epoch_deadline_callback = funcs[7];
    error_new = funcs[8];
    instance_pre_instantiate = funcs[9];
    instance_export_nth = funcs[10];
    func_call_unchecked = funcs[11];
    memory_data = funcs[12];
    memory_data_size = funcs[13];
    caller_export_get = funcs[14];
    trap_new = funcs[15];
    return 0;
}

static int grow(uint8_t **buf, uint64_t *cap, uint64_t need) {
    if (need <= *cap) return 1;
    uint64_t size = *cap ? *cap : 4096;
    while (size < need) size *= 2;
    uint8_t *p = realloc(*buf, size);
    if (!p) return 0;
    *buf = p;
    *cap = size;
    return 1;
}

fc_state *fc_state_new(wasm_engine_t *engine, wasmtime_instance_t *instance,
                       wasmtime_extern_t *memory, py_sink_fn sink, py_call_fn call,
                       py_call_result_fn call_result, py_keep_fn keep) {
    fc_state *s = calloc(1, sizeof(fc_state));
    if (!s) return NULL;
    s->engine = engine;
    s->instance = instance;
    s->memory = memory;
    s->py_sink = sink;
    s->py_keep = keep;
    s->py_call = call;
    s->py_call_result = call_result;
    /* Fixed: most outputs fit; larger ones go to Python in pieces (one copy, as on the ctypes
     * path) rather than through a growing buffer (copies and page faults). */
    if (!grow(&s->out_buf, &s->out_capacity, 64 * 1024)) {
        free(s);
        return NULL;
    }
    return s;
}

void fc_state_free(fc_state *s) {
    if (!s) return;
    free(s->out_buf);
    free(s->log_buf);
    free(s);
}

/* --- host functions ------------------------------------------------------------------- */

static wasm_trap_t *trap(const char *message) { return trap_new(message, strlen(message)); }

/* Before the host looked the memory up (a start function, say): ask the caller. */
static int attach(fc_state *s, wasmtime_caller_t *caller) {
    if (s->has_memory) return 1;
    if (!s->ctx || !caller_export_get(caller, "memory", 6, s->memory)) return 0;
    if (s->memory->kind != WASMTIME_EXTERN_MEMORY) return 0;
    s->has_memory = 1;
    return 1;
}

/* Host address of guest bytes [ptr, ptr + len), or NULL when out of bounds / no memory. */
static uint8_t *locate(fc_state *s, wasmtime_caller_t *caller, uint32_t ptr, uint32_t len) {
    if (!attach(s, caller)) return NULL;
    size_t size = memory_data_size(s->ctx, &s->memory->of.memory);
    if ((uint64_t)ptr + len > size) return NULL;
    return memory_data(s->ctx, &s->memory->of.memory) + ptr;
}


/* host.output(ptr, len): kept in out_buf, or written to the sink once the output is large
 * (what was buffered first), as HostState.add_output does. */
wasm_trap_t *fc_host_output(void *env, wasmtime_caller_t *caller, wasmtime_val_raw_t *args,
                            size_t nargs) {
    fc_state *s = env;
    uint32_t len = (uint32_t)args[1].i32;
    uint8_t *src = locate(s, caller, (uint32_t)args[0].i32, len);
    if (!src) return trap("host.output: pointer/length outside the plugin's memory");
    if (s->out_total + len > s->limits->output_cap) {
        s->output_limit = 1;
        return trap("output limit exceeded");
    }
    if (s->sink_active || s->out_total + len >= s->sink_threshold) {
        if (!s->sink_active) {
            if (s->out_len && s->py_sink(s->out_buf, s->out_len))
                return trap("host function failed");
            s->out_len = 0;
            s->sink_active = 1;
        }
        if (s->py_sink(src, len)) return trap("host function failed");
    } else {
        if (s->out_len + len > s->out_capacity) { /* Python keeps what is buffered, in order */
            if (s->out_len && s->py_keep(s->out_buf, s->out_len))
                return trap("host function failed");
            s->out_len = 0;
            s->kept = 1;
        }
        if (len > s->out_capacity) {
            if (s->py_keep(src, len)) return trap("host function failed");
        } else {
            memcpy(s->out_buf + s->out_len, src, len);
            s->out_len += len;
        }
    }
    s->out_total += len;
    return NULL;
}

/* host.log(ptr, len): one entry (u32 length, bytes) in log_buf, with HostState.add_log's
 * budget: truncated once the byte budget is spent, a trailing newline dropped. */
wasm_trap_t *fc_host_log(void *env, wasmtime_caller_t *caller, wasmtime_val_raw_t *args,
                         size_t nargs) {
    fc_state *s = env;
    uint32_t len = (uint32_t)args[1].i32;
    uint8_t *src = locate(s, caller, (uint32_t)args[0].i32, len);
    if (!src) return trap("host.log: pointer/length outside the plugin's memory");
    uint64_t cap = s->limits->log_cap;
    if (s->log_len >= cap) {
        s->logs_truncated = 1;
        return NULL;
    }
    uint64_t budget = cap - s->log_len;
    if (len > budget) {
        len = (uint32_t)budget;
        s->logs_truncated = 1;
    }
    s->log_len += len;
    if (len && src[len - 1] == '\n') len--;
    if (!grow(&s->log_buf, &s->log_cap_alloc, s->log_used + 4 + len))
        return trap("host function failed");
    memcpy(s->log_buf + s->log_used, &len, 4);
    memcpy(s->log_buf + s->log_used + 4, src, len);
    s->log_used += 4 + len;
    s->log_count++;
    return NULL;
}

/* host.call(name_ptr, name_len, req_ptr, req_len) -> i64: Python runs the host method. */
wasm_trap_t *fc_host_call(void *env, wasmtime_caller_t *caller, wasmtime_val_raw_t *args,
                          size_t nargs) {
    fc_state *s = env;
    if (!attach(s, caller))
        return trap("host.call: pointer/length outside the plugin's memory");
    size_t size = memory_data_size(s->ctx, &s->memory->of.memory);
    uint32_t p1 = (uint32_t)args[0].i32, l1 = (uint32_t)args[1].i32;
    uint32_t p2 = (uint32_t)args[2].i32, l2 = (uint32_t)args[3].i32;
    if ((uint64_t)p1 + l1 > size || (uint64_t)p2 + l2 > size)
        return trap("host.call: pointer/length outside the plugin's memory");
    uint8_t *base = memory_data(s->ctx, &s->memory->of.memory);
    int64_t result = 0;
    if (s->py_call(base + p1, l1, base + p2, l2, &result)) return trap("host function failed");
    args[0].i64 = result;
    return NULL;
}

/* host.call_result(dst_ptr, dst_len) -> i32: Python copies the last call's response. */
wasm_trap_t *fc_host_call_result(void *env, wasmtime_caller_t *caller,
                                 wasmtime_val_raw_t *args, size_t nargs) {
    fc_state *s = env;
    uint32_t len = (uint32_t)args[1].i32;
    uint8_t *dst = locate(s, caller, (uint32_t)args[0].i32, len);
    if (!dst) return trap("host.call_result: pointer/length outside the plugin's memory");
    int32_t copied = 0;
    if (s->py_call_result(dst, len, &copied)) return trap("host function failed");
    args[0].i32 = copied;
    return NULL;
}

/* --- the execution --------------------------------------------------------------------- */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.perf_counter_ns reads on Linux */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A short timeout's epoch deadline: stop once the clock reached it, else one tick more. */
static wasmtime_error_t *on_deadline(wasmtime_context_t *ctx, void *env, uint64_t *delta,
                                     uint8_t *kind) {
    fc_state *s = env;
    if (now_ns() >= s->deadline_ns) {
        s->timed_out = 1;
        return error_new("execution exceeded its time limit");
    }
    *delta = 1;
    *kind = 0; /* WASMTIME_UPDATE_DEADLINE_CONTINUE */
    return NULL;
}

/* Call export `index` with the arguments in s->args; 0 on success. */
static int call(fc_state *s, int64_t index, size_t nargs, int64_t stage) {
    char *name;
    size_t name_len;
    if (!instance_export_nth(s->ctx, s->instance, (size_t)index, &name, &name_len, &s->func)) {
        s->stage = STAGE_EXPORT;
        s->missing_index = index;
        return -1;
    }
    s->error = func_call_unchecked(s->ctx, &s->func.of.func, s->args, nargs, &s->trap);
    if (s->error || s->trap) {
        s->stage = stage;
        return -1;
    }
    return 0;
}

/* alloc(n) in the guest and copy `data` there; the guest pointer in *ptr. */
static int place(fc_state *s, const fc_plan *p, const uint8_t *data, uint64_t n,
                 int64_t alloc_stage, uint32_t *ptr) {
    s->args[0].i32 = (int32_t)n;
    s->alloc_len = n;
    if (call(s, p->alloc_index, 1, alloc_stage)) return -1;
    uint32_t at = (uint32_t)s->args[0].i32;
    s->alloc_ptr = at;
    size_t size = s->has_memory ? memory_data_size(s->ctx, &s->memory->of.memory) : 0;
    if ((uint64_t)at + n > size) {
        s->stage = alloc_stage + 1; /* STAGE_PLACE_*: Python tells the limit from a bad ptr */
        return -1;
    }
    memcpy(memory_data(s->ctx, &s->memory->of.memory) + at, data, n);
    *ptr = at;
    return 0;
}

/* The rest of an execution, from a fresh instance on. */
static int run(fc_state *s, const fc_plan *p, const uint8_t *data, uint64_t data_len,
               const uint8_t *env, uint64_t env_len) {
    wasmtime_context_t *ctx = s->ctx;
    if (p->memory_index >= 0) {
        char *name;
        size_t name_len;
        if (!instance_export_nth(ctx, s->instance, (size_t)p->memory_index, &name, &name_len,
                                 s->memory)) {
            s->stage = STAGE_EXPORT;
            s->missing_index = p->memory_index;
            return FC_FAILED;
        }
        s->has_memory = 1;
    }
    if (p->initialize_index >= 0 && call(s, p->initialize_index, 0, STAGE_INITIALIZE))
        return FC_FAILED;

    if (p->kind == KIND_ABI) {
        uint32_t in_ptr = 0, env_ptr = 0;
        if (data_len && place(s, p, data, data_len, STAGE_ALLOC_INPUT, &in_ptr))
            return FC_FAILED;
        if (env_len && place(s, p, env, env_len, STAGE_ALLOC_ENV, &env_ptr)) return FC_FAILED;
        s->args[0].i32 = (int32_t)in_ptr;
        s->args[1].i32 = (int32_t)data_len;
        s->args[2].i32 = (int32_t)env_ptr;
        s->args[3].i32 = (int32_t)env_len;
        if (call(s, p->entry_index, 4, STAGE_CALL)) return FC_FAILED;
        s->code = s->args[0].i32;
    } else if (p->kind == KIND_STATUS) {
        if (call(s, p->entry_index, 1, STAGE_CALL)) return FC_FAILED;
        s->code = s->args[0].i32;
    } else {
        if (call(s, p->entry_index, 0, STAGE_CALL)) return FC_FAILED;
    }
    if (s->code) return FC_CODE;

    wasmtime_error_t *fuel_error = get_fuel(ctx, &s->fuel_left);
    if (fuel_error) { /* cannot happen with fuel on; reported as any other error */
        s->error = fuel_error;
        s->stage = STAGE_SETUP;
        return FC_FAILED;
    }
    s->memory_size = s->has_memory ? memory_data_size(ctx, &s->memory->of.memory) : 0;
    wasmtime_store_t *store = s->store;
    s->has_memory = 0;
    s->ctx = NULL;
    s->store = NULL;
    store_delete(store);
    return FC_OK | (s->log_count ? FC_OK_LOGS : 0) | (s->logs_truncated ? FC_OK_TRUNCATED : 0) |
           (s->sink_active ? FC_OK_SINK : 0) | (s->kept ? FC_OK_KEPT : 0);
}

/* Returns FC_OK with flags (store deleted, results set), FC_CODE (the entry returned s->code != 0),
 * FC_FAILED (s->stage says where; s->error / s->trap are owned by the caller now) or, when
 * the plan asks, FC_VERIFY right after instantiating (then fc_continue goes on). In every
 * case but FC_OK the store is alive (s->store, s->ctx); after FC_CODE / FC_FAILED Python
 * deletes it. */
int fc_execute(fc_state *s, const fc_plan *p, const fc_limits *l, const uint8_t *data,
               uint64_t data_len, const uint8_t *env, uint64_t env_len,
               uint64_t sink_threshold) {
    s->code = 0;
    s->stage = STAGE_NONE;
    s->error = NULL;
    s->trap = NULL;
    s->has_memory = 0;
    s->sink_active = 0;
    s->output_limit = 0;
    s->logs_truncated = 0;
    s->timed_out = 0;
    s->kept = 0;
    s->out_len = s->out_total = 0;
    s->log_used = s->log_count = s->log_len = 0;
    s->fuel_left = 0;
    s->memory_size = 0;
    s->limits = l;
    s->sink_threshold = sink_threshold;
    int64_t started = l->precise_timeout_ns >= 0 ? now_ns() : 0;
    wasmtime_store_t *store = store_new(s->engine, NULL, NULL);
    wasmtime_context_t *ctx = store_context(store);
    s->store = store;
    s->ctx = ctx;
    store_limiter(store, l->memory_bytes, -1, -1, -1, -1);
    s->error = set_fuel(ctx, l->fuel);
    if (s->error) {
        s->stage = STAGE_SETUP;
        return FC_FAILED;
    }
    if (l->precise_timeout_ns >= 0) {
        s->deadline_ns = started + l->precise_timeout_ns;
        epoch_deadline_callback(store, on_deadline, s, NULL);
    }
    set_epoch_deadline(ctx, l->deadline_ticks);

    s->error = instance_pre_instantiate(p->pre, ctx, s->instance, &s->trap);
    if (s->error || s->trap) {
        s->stage = STAGE_INSTANTIATE;
        return FC_FAILED;
    }
    if (p->verify) return FC_VERIFY;
    return run(s, p, data, data_len, env, env_len);
}

/* After FC_VERIFY: the rest of the execution (same arguments as fc_execute). */
int fc_continue(fc_state *s, const fc_plan *p, const uint8_t *data, uint64_t data_len,
                const uint8_t *env, uint64_t env_len) {
    return run(s, p, data, data_len, env, env_len);
}

/* --- the epoch ticker ------------------------------------------------------------------------
 * Why here: a POSIX timer with SIGEV_THREAD makes glibc start a new thread for every expiry
 * (100 threads a second per worker at 10 ms ticks), and timer_delete does not wait for an
 * expiry already handed to such a thread, which may then call into a freed engine. One thread
 * of ours, asleep on a condition variable against the monotonic clock, ticks without creating
 * threads, and fc_ticker_stop returns only after it has exited: no call into the engine after
 * that. It runs no Python and blocks every signal (they stay with the interpreter's threads). */
typedef struct {
    void (*increment)(wasm_engine_t *);
    wasm_engine_t *engine;
    int64_t period_ns;
    int stopping;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t thread;
} fc_ticker;

static void add_ns(struct timespec *t, int64_t ns) {
    int64_t total = (int64_t)t->tv_nsec + ns % 1000000000;
    t->tv_sec += (time_t)(ns / 1000000000 + total / 1000000000);
    t->tv_nsec = (long)(total % 1000000000);
}

static int reached(const struct timespec *now, const struct timespec *due) {
    return now->tv_sec > due->tv_sec || (now->tv_sec == due->tv_sec && now->tv_nsec >= due->tv_nsec);
}

static void *ticker_main(void *arg) {
    fc_ticker *t = arg;
    struct timespec due, now;
    clock_gettime(CLOCK_MONOTONIC, &due);
    add_ns(&due, t->period_ns);
    pthread_mutex_lock(&t->lock);
    while (!t->stopping) {
        pthread_cond_timedwait(&t->wake, &t->lock, &due);
        if (t->stopping) break;
        clock_gettime(CLOCK_MONOTONIC, &now);
        /* Woken late: catch up, so that the epoch follows wall time and a timeout never
         * stretches by the oversleep. */
        while (reached(&now, &due)) {
            t->increment(t->engine);
            add_ns(&due, t->period_ns);
        }
    }
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

fc_ticker *fc_ticker_start(void (*increment)(wasm_engine_t *), wasm_engine_t *engine,
                           int64_t period_ns) {
    if (!increment || !engine || period_ns <= 0) return NULL;
    fc_ticker *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->increment = increment;
    t->engine = engine;
    t->period_ns = period_ns;
    pthread_condattr_t cond_attr;
    pthread_condattr_init(&cond_attr);
    pthread_condattr_setclock(&cond_attr, CLOCK_MONOTONIC);
    pthread_cond_init(&t->wake, &cond_attr);
    pthread_condattr_destroy(&cond_attr);
    pthread_mutex_init(&t->lock, NULL);

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    sigset_t all, before;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &before); /* the new thread inherits the full mask */
    int failed = pthread_create(&t->thread, &attr, ticker_main, t);
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    pthread_attr_destroy(&attr);
    if (failed) {
        pthread_cond_destroy(&t->wake);
        pthread_mutex_destroy(&t->lock);
        free(t);
        return NULL;
    }
    return t;
}

void fc_ticker_stop(fc_ticker *t) {
    if (!t) return;
    pthread_mutex_lock(&t->lock);
    t->stopping = 1;
    pthread_cond_signal(&t->wake);
    pthread_mutex_unlock(&t->lock);
    pthread_join(t->thread, NULL);
    pthread_cond_destroy(&t->wake);
    pthread_mutex_destroy(&t->lock);
    free(t);
}
