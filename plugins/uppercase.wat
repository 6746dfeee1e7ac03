;; uppercase.wat -- wasm-core sample plugin (ABI kind 1: core module)
;;
;; process(input, env): uppercases ASCII a-z of the input in place, then hands
;; the whole buffer to the host with a single host.output call. Other bytes
;; (including UTF-8 multi-byte sequences) are passed through unchanged.
;; Always returns 0.
(module
  (import "host" "output" (func $output (param i32 i32)))

  ;; One 64 KiB page to start with; the allocator grows it on demand.
  (memory (export "memory") 1)

  ;; Bump allocator. Bytes 0..1023 are reserved for static data, the heap
  ;; starts at 1024 and only ever moves forward (the instance is thrown away
  ;; after each execution, so nothing is ever freed).
  (global $heap (mut i32) (i32.const 1024))

  ;; alloc(len) -> ptr: 8-byte aligned, grows memory when needed, traps
  ;; (unreachable) when memory cannot grow (e.g. the host's memory cap).
  (func $alloc (export "alloc") (param $len i32) (result i32)
    (local $ptr i32) (local $end i64) (local $pages i64)
    (local.set $ptr
      (i32.and (i32.add (global.get $heap) (i32.const 7)) (i32.const -8)))
    (local.set $end
      (i64.add (i64.extend_i32_u (local.get $ptr)) (i64.extend_i32_u (local.get $len))))
    ;; pages needed to hold [0, end)
    (local.set $pages
      (i64.shr_u (i64.add (local.get $end) (i64.const 65535)) (i64.const 16)))
    (if (i64.gt_u (local.get $pages) (i64.extend_i32_u (memory.size)))
      (then
        (if (i32.eq
              (memory.grow
                (i32.wrap_i64
                  (i64.sub (local.get $pages) (i64.extend_i32_u (memory.size)))))
              (i32.const -1))
          (then unreachable))))
    (global.set $heap (i32.wrap_i64 (local.get $end)))
    (local.get $ptr))

  (func (export "process")
        (param $in i32) (param $in_len i32) (param $env i32) (param $env_len i32)
        (result i32)
    (local $p i32) (local $end i32) (local $c i32)
    (local.set $p (local.get $in))
    (local.set $end (i32.add (local.get $in) (local.get $in_len)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
        (local.set $c (i32.load8_u (local.get $p)))
        ;; 'a' (97) <= c <= 'z' (122)  <=>  (c - 97) <u 26
        (if (i32.lt_u (i32.sub (local.get $c) (i32.const 97)) (i32.const 26))
          (then (i32.store8 (local.get $p) (i32.sub (local.get $c) (i32.const 32)))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $next)))
    (if (local.get $in_len)
      (then (call $output (local.get $in) (local.get $in_len))))
    (i32.const 0))
)
