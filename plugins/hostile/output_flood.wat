;; hostile/output_flood.wat -- calls host.output with the same 64 KiB buffer
;; forever. Expected: OUTPUT_LIMIT.
(module
  (import "host" "output" (func $output (param i32 i32)))
  ;; 2 pages: the 64 KiB buffer lives at 1024..66559, the heap starts at 66560
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 66560))

  ;; bump allocator (same as the sample plugins)
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

  (func (export "process")
        (param $in i32) (param $in_len i32) (param $env i32) (param $env_len i32)
        (result i32)
    (memory.fill (i32.const 1024) (i32.const 65) (i32.const 65536))  ;; 'A' * 64 KiB
    (loop $forever
      (call $output (i32.const 1024) (i32.const 65536))
      (br $forever))
    (i32.const 0))
)
