;; rot13.wat -- wasm-core sample plugin (ABI kind 1: core module)
;;
;; process(input, env): applies ROT13 to ASCII letters (A-Z, a-z) in place and
;; outputs the result with one host.output call. All other bytes are passed
;; through unchanged. Always returns 0.
(module
  (import "host" "output" (func $output (param i32 i32)))

  (memory (export "memory") 1)

  ;; Bump allocator: static data below 1024, heap from 1024 upwards.
  (global $heap (mut i32) (i32.const 1024))

  (func $alloc (export "alloc") (param $len i32) (result i32)
    (local $ptr i32) (local $end i64) (local $pages i64)
    (local.set $ptr
      (i32.and (i32.add (global.get $heap) (i32.const 7)) (i32.const -8)))
    (local.set $end
      (i64.add (i64.extend_i32_u (local.get $ptr)) (i64.extend_i32_u (local.get $len))))
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

  ;; rotate one byte: base is 'a' or 'A'
  (func $rot (param $c i32) (param $base i32) (result i32)
    (i32.add
      (local.get $base)
      (i32.rem_u
        (i32.add (i32.sub (local.get $c) (local.get $base)) (i32.const 13))
        (i32.const 26))))

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
        (if (i32.lt_u (i32.sub (local.get $c) (i32.const 97)) (i32.const 26))   ;; a-z
          (then (i32.store8 (local.get $p) (call $rot (local.get $c) (i32.const 97))))
          (else
            (if (i32.lt_u (i32.sub (local.get $c) (i32.const 65)) (i32.const 26)) ;; A-Z
              (then (i32.store8 (local.get $p) (call $rot (local.get $c) (i32.const 65)))))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $next)))
    (if (local.get $in_len)
      (then (call $output (local.get $in) (local.get $in_len))))
    (i32.const 0))
)
