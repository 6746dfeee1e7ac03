;; hostile/unit_mix.wat -- quick, except where its input says otherwise (units' tests):
;; first byte 'L': loops forever (expected: TIMEOUT from the epoch), 'T': traps,
;; 'H': blocks in a host call (poll_oneoff on a 60 s clock: only the supervisor's deadline
;; ends it); anything else: the input comes back as the output.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "host" "output" (func $output (param i32 i32)))
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
    (local $c i32)
    (if (local.get $in_len)
      (then (local.set $c (i32.load8_u (local.get $in)))))
    (if (i32.eq (local.get $c) (i32.const 76)) ;; 'L'
      (then (loop $forever (br $forever))))
    (if (i32.eq (local.get $c) (i32.const 84)) ;; 'T'
      (then unreachable))
    (if (i32.eq (local.get $c) (i32.const 72)) ;; 'H'
      (then
        ;; subscription at 0: clock (tag 0 at 8), monotonic (id 1 at 16), 60 s at 24
        (i32.store8 (i32.const 8) (i32.const 0))
        (i32.store (i32.const 16) (i32.const 1))
        (i64.store (i32.const 24) (i64.const 60000000000))
        (i64.store (i32.const 32) (i64.const 0))
        (i32.store16 (i32.const 40) (i32.const 0))
        (drop (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))
    (if (local.get $in_len)
      (then (call $output (local.get $in) (local.get $in_len))))
    (i32.const 0))
)
