;; hostile/memory_bomb.wat -- grows memory by 16 pages (1 MiB) at a time,
;; touching each new chunk. When a 1 MiB grow fails it goes on one page at a
;; time, so that memory ends up exactly at the host's cap whatever the cap is,
;; and when memory.grow(1) also returns -1 it traps with unreachable.
;; Expected: MEMORY_LIMIT (the execution fails while memory is at the cap).
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))

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
    (local $old i32) (local $step i32)
    (local.set $step (i32.const 16))
    (loop $more
      (local.set $old (memory.grow (local.get $step)))
      (if (i32.eq (local.get $old) (i32.const -1))
        (then
          ;; already down to single pages: memory is at the cap
          (if (i32.eq (local.get $step) (i32.const 1)) (then unreachable))
          (local.set $step (i32.const 1))
          (br $more)))
      ;; touch the first byte of the new chunk so it is really committed
      (i32.store8 (i32.shl (local.get $old) (i32.const 16)) (i32.const 1))
      (br $more))
    (i32.const 0))
)
