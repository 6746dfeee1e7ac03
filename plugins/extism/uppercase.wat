;; uppercase.wat -- the uppercase sample plugin in Extism's ABI (for bench/suite.py only).
;;
;; upper(): reads the call's input from the Extism kernel, uppercases ASCII a-z (other bytes
;; pass through, as in plugins/uppercase.wat), writes the result to kernel memory and sets it
;; as the output. Returns 0.
;;
;; Extism plugins have no direct access to the input: every byte crosses a kernel call, so
;; the bulk of the input moves 8 bytes per call (input_load_u64 / store_u64) and each word is
;; uppercased with SWAR arithmetic; only the last < 8 bytes go one at a time.
(module
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
  (import "extism:host/env" "input_load_u64" (func $input_load_u64 (param i64) (result i64)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "store_u64" (func $store_u64 (param i64 i64)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))

  ;; Uppercase the 8 bytes of $x at once. Per byte b with h = b & 0x7f (no carry between
  ;; bytes since h + 0x1f <= 0x9e): bit 7 of h + 0x1f is set iff h >= 'a', bit 7 of
  ;; h + 0x05 is set iff h > 'z', and bytes >= 0x80 are excluded with ~b. The lowercase
  ;; mask's 0x80 bits shifted right by 2 are exactly the 0x20 to clear.
  (func $upper8 (param $x i64) (result i64)
    (local $h i64) (local $lower i64)
    (local.set $h (i64.and (local.get $x) (i64.const 0x7f7f7f7f7f7f7f7f)))
    (local.set $lower
      (i64.and
        (i64.and
          (i64.add (local.get $h) (i64.const 0x1f1f1f1f1f1f1f1f))
          (i64.xor (i64.add (local.get $h) (i64.const 0x0505050505050505)) (i64.const -1)))
        (i64.and (i64.xor (local.get $x) (i64.const -1)) (i64.const 0x8080808080808080))))
    (i64.xor (local.get $x) (i64.shr_u (local.get $lower) (i64.const 2))))

  (func (export "upper") (result i32)
    (local $n i64) (local $out i64) (local $i i64) (local $c i32)
    (local.set $n (call $input_length))
    (local.set $out (call $alloc (local.get $n)))
    (block $words_done
      (loop $words
        (br_if $words_done
          (i64.gt_u (i64.add (local.get $i) (i64.const 8)) (local.get $n)))
        (call $store_u64
          (i64.add (local.get $out) (local.get $i))
          (call $upper8 (call $input_load_u64 (local.get $i))))
        (local.set $i (i64.add (local.get $i) (i64.const 8)))
        (br $words)))
    (block $bytes_done
      (loop $bytes
        (br_if $bytes_done (i64.ge_u (local.get $i) (local.get $n)))
        (local.set $c (call $input_load_u8 (local.get $i)))
        (if (i32.lt_u (i32.sub (local.get $c) (i32.const 97)) (i32.const 26))
          (then (local.set $c (i32.sub (local.get $c) (i32.const 32)))))
        (call $store_u8 (i64.add (local.get $out) (local.get $i)) (local.get $c))
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (br $bytes)))
    (call $output_set (local.get $out) (local.get $n))
    (i32.const 0))
)
