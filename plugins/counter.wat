;; counter.wat -- wasm-core sample plugin (ABI kind 1: core module)
;;
;; process(input, env): outputs one line, without a trailing newline:
;;     bytes=B words=W lines=L
;;   B = input length in bytes.
;;   W = number of maximal runs of bytes that are not whitespace, where
;;       whitespace is exactly: space (0x20), tab (0x09), LF (0x0A), CR (0x0D).
;;   L = number of LF (0x0A) bytes, plus 1 if the input is non-empty and its
;;       last byte is not LF (an unterminated last line still counts).
;;       "" -> 0, "a" -> 1, "a\n" -> 1, "a\nb" -> 2, "\n\n" -> 2.
;; Always returns 0.
(module
  (import "host" "output" (func $output (param i32 i32)))

  (memory (export "memory") 1)

  ;; static data (below 1024)
  (data (i32.const 16) "bytes=")    ;; 6 bytes
  (data (i32.const 32) " words=")   ;; 7 bytes
  (data (i32.const 48) " lines=")   ;; 7 bytes
  ;; 256..511: scratch buffer for the result line (max ~50 bytes)

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

  ;; write n (unsigned decimal) at dst, return dst + number of digits
  (func $utoa (param $dst i32) (param $n i32) (result i32)
    (local $len i32) (local $t i32) (local $p i32)
    (local.set $len (i32.const 1))
    (local.set $t (local.get $n))
    (block $b
      (loop $l
        (br_if $b (i32.lt_u (local.get $t) (i32.const 10)))
        (local.set $t (i32.div_u (local.get $t) (i32.const 10)))
        (local.set $len (i32.add (local.get $len) (i32.const 1)))
        (br $l)))
    (local.set $p (i32.add (local.get $dst) (local.get $len)))
    (loop $w
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $w (i32.gt_u (local.get $p) (local.get $dst))))
    (i32.add (local.get $dst) (local.get $len)))

  (func $is_space (param $c i32) (result i32)
    (i32.or
      (i32.or (i32.eq (local.get $c) (i32.const 32)) (i32.eq (local.get $c) (i32.const 9)))
      (i32.or (i32.eq (local.get $c) (i32.const 10)) (i32.eq (local.get $c) (i32.const 13)))))

  (func (export "process")
        (param $in i32) (param $in_len i32) (param $env i32) (param $env_len i32)
        (result i32)
    (local $i i32) (local $c i32) (local $in_word i32)
    (local $words i32) (local $lines i32) (local $dst i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $in_len)))
        (local.set $c (i32.load8_u (i32.add (local.get $in) (local.get $i))))
        (if (i32.eq (local.get $c) (i32.const 10))
          (then (local.set $lines (i32.add (local.get $lines) (i32.const 1)))))
        (if (call $is_space (local.get $c))
          (then (local.set $in_word (i32.const 0)))
          (else
            (if (i32.eqz (local.get $in_word))
              (then
                (local.set $words (i32.add (local.get $words) (i32.const 1)))
                (local.set $in_word (i32.const 1))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    ;; unterminated last line
    (if (local.get $in_len)
      (then
        (if (i32.ne
              (i32.load8_u (i32.sub (i32.add (local.get $in) (local.get $in_len)) (i32.const 1)))
              (i32.const 10))
          (then (local.set $lines (i32.add (local.get $lines) (i32.const 1)))))))
    ;; build "bytes=B words=W lines=L" at 256
    (local.set $dst (i32.const 256))
    (memory.copy (local.get $dst) (i32.const 16) (i32.const 6))
    (local.set $dst (call $utoa (i32.add (local.get $dst) (i32.const 6)) (local.get $in_len)))
    (memory.copy (local.get $dst) (i32.const 32) (i32.const 7))
    (local.set $dst (call $utoa (i32.add (local.get $dst) (i32.const 7)) (local.get $words)))
    (memory.copy (local.get $dst) (i32.const 48) (i32.const 7))
    (local.set $dst (call $utoa (i32.add (local.get $dst) (i32.const 7)) (local.get $lines)))
    (call $output (i32.const 256) (i32.sub (local.get $dst) (i32.const 256)))
    (i32.const 0))
)
