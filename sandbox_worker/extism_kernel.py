"""The Extism kernel, written here in WAT: the `extism:host/env` memory functions.

Extism plugins never see their input or output in their own memory: they allocate blocks in
the *kernel's* memory and move bytes with load/store calls, often 8 bytes per call. Those
calls are the hot path, so the kernel is a small wasm module instantiated in the plugin's
store and linked to its imports: a load or store is a wasm-to-wasm call, never a Python one.
The host writes the input into kernel memory in bulk before the call and reads the output and
the error message out in bulk after it (sandbox_worker/extism.py). Written for wasm-core from
Extism's documented behaviour; no Extism code.

Kernel memory layout (all little-endian u64):

    0   input offset        8   input length
    16  output offset       24  output length
    32  error offset        40  heap top (first byte after the last block)
    64  heap: blocks of [u64 length][u64 tag][data], the block's offset is its data's;
        tag = offset XOR MAGIC while allocated, 0 once freed.

Offset 0 is never a block (Extism's null). Allocation is a bump allocator: an execution is
short and its store is thrown away afterwards, so freed space is only reused when it was the
last block. Offsets of 2^32 or more trap (the memory is 32-bit).
"""

from __future__ import annotations

MAGIC = 0x45585449534D4B31  # "EXTISMK1"
HEAP = 64
INPUT_OFFSET, INPUT_LENGTH, OUTPUT_OFFSET, OUTPUT_LENGTH, ERROR_OFFSET, TOP = 0, 8, 16, 24, 32, 40
HOST_MODULE = "wasmcore:extism"  # the kernel's own imports, provided by the host

# The functions the kernel itself exports under `extism:host/env` (name -> (params, results)).
KERNEL_FUNCTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alloc": (("i64",), ("i64",)),
    "free": (("i64",), ()),
    "length": (("i64",), ("i64",)),
    "length_unsafe": (("i64",), ("i64",)),
    "load_u8": (("i64",), ("i32",)),
    "load_u64": (("i64",), ("i64",)),
    "store_u8": (("i64", "i32"), ()),
    "store_u64": (("i64", "i64"), ()),
    "input_length": ((), ("i64",)),
    "input_offset": ((), ("i64",)),
    "input_load_u8": (("i64",), ("i32",)),
    "input_load_u64": (("i64",), ("i64",)),
    "output_set": (("i64", "i64"), ()),
    "error_set": (("i64",), ()),
    "error_get": ((), ("i64",)),
    "memory_bytes": ((), ("i64",)),
    "reset": ((), ()),
    "get_log_level": ((), ("i32",)),
}

KERNEL_WAT = f"""
(module
  ;; Called when the kernel's memory cannot grow for an allocation of $n bytes: the host
  ;; records a MEMORY_LIMIT and traps.
  (import "{HOST_MODULE}" "out_of_memory" (func $out_of_memory (param i64)))
  (memory (export "memory") 1)
  (global $MAGIC i64 (i64.const {MAGIC}))

  (func $addr (param $offs i64) (result i32)
    (if (i64.ne (i64.shr_u (local.get $offs) (i64.const 32)) (i64.const 0))
      (then unreachable))
    (i32.wrap_i64 (local.get $offs)))

  ;; Length of the allocated block at $offs, or -1 when $offs is not one.
  (func $block_length (param $offs i64) (result i64)
    (local $a i32)
    (if (i64.lt_u (local.get $offs) (i64.const {HEAP + 16})) (then (return (i64.const -1))))
    (if (i64.gt_u (local.get $offs) (i64.load (i32.const {TOP}))) (then (return (i64.const -1))))
    (local.set $a (i32.wrap_i64 (local.get $offs)))
    (if (i64.ne (i64.load (i32.sub (local.get $a) (i32.const 8)))
                (i64.xor (local.get $offs) (global.get $MAGIC)))
      (then (return (i64.const -1))))
    (i64.load (i32.sub (local.get $a) (i32.const 16))))

  (func $alloc (export "alloc") (param $n i64) (result i64)
    (local $offs i64) (local $top i64) (local $pages i64)
    (if (i64.eqz (local.get $n)) (then (return (i64.const 0))))
    ;; The heap top lives in memory the plugin can write: bound it too, so the sums below
    ;; cannot wrap and the page count fits an i32 (memory.grow then fails: out of memory).
    (if (i32.or (i64.gt_u (local.get $n) (i64.const 0xfffe0000))
                (i64.gt_u (i64.load (i32.const {TOP})) (i64.const 0xfffe0000)))
      (then (call $out_of_memory (local.get $n)) unreachable))
    (local.set $offs (i64.add (i64.load (i32.const {TOP})) (i64.const 16)))
    (local.set $top (i64.and (i64.add (i64.add (local.get $offs) (local.get $n)) (i64.const 7))
                             (i64.const -8)))
    (local.set $pages
      (i64.sub (i64.shr_u (i64.add (local.get $top) (i64.const 0xffff)) (i64.const 16))
               (i64.extend_i32_u (memory.size))))
    (if (i64.gt_s (local.get $pages) (i64.const 0))
      (then
        (if (i32.eq (memory.grow (i32.wrap_i64 (local.get $pages))) (i32.const -1))
          (then (call $out_of_memory (local.get $n)) unreachable))))
    (i64.store (i32.wrap_i64 (i64.sub (local.get $offs) (i64.const 16))) (local.get $n))
    (i64.store (i32.wrap_i64 (i64.sub (local.get $offs) (i64.const 8)))
               (i64.xor (local.get $offs) (global.get $MAGIC)))
    (i64.store (i32.const {TOP}) (local.get $top))
    (local.get $offs))

  (func (export "free") (param $offs i64)
    (local $n i64)
    (local.set $n (call $block_length (local.get $offs)))
    (if (i64.lt_s (local.get $n) (i64.const 0)) (then (return)))
    (i64.store (i32.wrap_i64 (i64.sub (local.get $offs) (i64.const 8))) (i64.const 0))
    ;; The last block: give its space back.
    (if (i64.eq (i64.and (i64.add (i64.add (local.get $offs) (local.get $n)) (i64.const 7))
                         (i64.const -8))
                (i64.load (i32.const {TOP})))
      (then (i64.store (i32.const {TOP}) (i64.sub (local.get $offs) (i64.const 16))))))

  (func (export "length") (param $offs i64) (result i64)
    (local $n i64)
    (local.set $n (call $block_length (local.get $offs)))
    (select (i64.const 0) (local.get $n) (i64.lt_s (local.get $n) (i64.const 0))))

  (func (export "length_unsafe") (param $offs i64) (result i64)
    (i64.load (i32.sub (call $addr (local.get $offs)) (i32.const 16))))

  (func (export "load_u8") (param $offs i64) (result i32)
    (i32.load8_u (call $addr (local.get $offs))))
  (func (export "load_u64") (param $offs i64) (result i64)
    (i64.load (call $addr (local.get $offs))))
  (func (export "store_u8") (param $offs i64) (param $v i32)
    (i32.store8 (call $addr (local.get $offs)) (local.get $v)))
  (func (export "store_u64") (param $offs i64) (param $v i64)
    (i64.store (call $addr (local.get $offs)) (local.get $v)))

  (func (export "input_length") (result i64) (i64.load (i32.const {INPUT_LENGTH})))
  (func (export "input_offset") (result i64) (i64.load (i32.const {INPUT_OFFSET})))
  (func (export "input_load_u8") (param $i i64) (result i32)
    (if (i64.ge_u (local.get $i) (i64.load (i32.const {INPUT_LENGTH}))) (then unreachable))
    (i32.load8_u (i32.wrap_i64 (i64.add (i64.load (i32.const {INPUT_OFFSET})) (local.get $i)))))
  (func (export "input_load_u64") (param $i i64) (result i64)
    (if (i64.gt_u (i64.add (local.get $i) (i64.const 8)) (i64.load (i32.const {INPUT_LENGTH})))
      (then unreachable))
    (i64.load (i32.wrap_i64 (i64.add (i64.load (i32.const {INPUT_OFFSET})) (local.get $i)))))

  (func (export "output_set") (param $offs i64) (param $n i64)
    (i64.store (i32.const {OUTPUT_OFFSET}) (local.get $offs))
    (i64.store (i32.const {OUTPUT_LENGTH}) (local.get $n)))
  (func (export "error_set") (param $offs i64)
    (i64.store (i32.const {ERROR_OFFSET}) (local.get $offs)))
  (func (export "error_get") (result i64) (i64.load (i32.const {ERROR_OFFSET})))
  (func (export "memory_bytes") (result i64)
    (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)))
  ;; Forget every block after the input, and the output and error.
  (func (export "reset")
    (local $end i64)
    (local.set $end (i64.add (i64.load (i32.const {INPUT_OFFSET}))
                             (i64.load (i32.const {INPUT_LENGTH}))))
    (if (i64.eqz (i64.load (i32.const {INPUT_OFFSET}))) (then (local.set $end (i64.const {HEAP}))))
    (i64.store (i32.const {TOP}) (i64.and (i64.add (local.get $end) (i64.const 7)) (i64.const -8)))
    (i64.store (i32.const {OUTPUT_OFFSET}) (i64.const 0))
    (i64.store (i32.const {OUTPUT_LENGTH}) (i64.const 0))
    (i64.store (i32.const {ERROR_OFFSET}) (i64.const 0)))
  ;; Every level is captured (the execution's logs are budgeted by the host): 0 = trace.
  (func (export "get_log_level") (result i32) (i32.const 0))

  ;; For the host only: allocate the input block and record it. Returns its offset.
  (func (export "wasmcore_input") (param $n i64) (result i64)
    (local $offs i64)
    (i64.store (i32.const {TOP}) (i64.const {HEAP}))
    (local.set $offs (call $alloc (local.get $n)))
    (i64.store (i32.const {INPUT_OFFSET}) (local.get $offs))
    (i64.store (i32.const {INPUT_LENGTH}) (local.get $n))
    (local.get $offs))
)
"""
