;; Makes the worker's RSS grow, then keeps running: input bytes 0..3 (u32 LE) = MiB to touch,
;; bytes 4..7 (u32 LE) = millions of loop iterations to spin afterwards. Returns 0.
;; It touches one byte per 4 KiB page so the memory is really resident, not just reserved.
(module
  (import "host" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "alloc") (param $len i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $len)))
    (local.get $ptr))
  (func (export "process") (param $in i32) (param $in_len i32) (param $env i32) (param $env_len i32) (result i32)
    (local $mib i32) (local $spin i32) (local $base i32) (local $addr i32) (local $end i32)
    (local.set $mib (i32.load (local.get $in)))
    (local.set $spin (i32.mul (i32.load offset=4 (local.get $in)) (i32.const 1000000)))
    (local.set $base (i32.mul (memory.grow (i32.mul (local.get $mib) (i32.const 16))) (i32.const 65536)))
    (if (i32.lt_s (local.get $base) (i32.const 0)) (then (unreachable)))
    (local.set $addr (local.get $base))
    (local.set $end (i32.add (local.get $base) (i32.mul (local.get $mib) (i32.const 1048576))))
    (block $done
      (loop $touch
        (br_if $done (i32.ge_u (local.get $addr) (local.get $end)))
        (i32.store8 (local.get $addr) (i32.const 1))
        (local.set $addr (i32.add (local.get $addr) (i32.const 4096)))
        (br $touch)))
    (block $stop
      (loop $spin
        (br_if $stop (i32.eqz (local.get $spin)))
        (local.set $spin (i32.sub (local.get $spin) (i32.const 1)))
        (br $spin)))
    (call $output (i32.const 0) (i32.const 0))
    (i32.const 0)))
