;; env_reader.wat -- wasm-core sample plugin (ABI kind 1: core module)
;;
;; The environment arrives as KEY=VALUE entries, each ended by a NUL byte.
;; (Bytes after the last NUL, if any, are treated as one more entry; empty
;; entries, i.e. two NULs in a row, are skipped.)
;;
;; process(input, env):
;;   * empty input   -> outputs every entry as "KEY=VALUE\n", in the order
;;                      given; returns 0 (no env -> empty output).
;;   * input = KEY   -> outputs the VALUE of the first entry whose key (the
;;                      bytes before the first '=') equals the input exactly,
;;                      with no trailing newline; returns 0.
;;                      Returns 2 (PLUGIN_ERROR, code 2) and outputs nothing
;;                      when no entry has that key.
;;   In both modes it first emits one log line: "env-reader: N entries".
(module
  (import "host" "output" (func $output (param i32 i32)))
  (import "host" "log" (func $log (param i32 i32)))

  (memory (export "memory") 1)

  (data (i32.const 16) "\n")
  (data (i32.const 32) "env-reader: ")  ;; 12 bytes
  (data (i32.const 48) " entries")      ;; 8 bytes
  ;; 256..511: scratch buffer for the log line

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

  ;; first address in [p, end) holding byte c, or end
  (func $find (param $p i32) (param $end i32) (param $c i32) (result i32)
    (block $b
      (loop $l
        (br_if $b (i32.ge_u (local.get $p) (local.get $end)))
        (br_if $b (i32.eq (i32.load8_u (local.get $p)) (local.get $c)))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $l)))
    (local.get $p))

  ;; 1 if the n bytes at a and b are equal
  (func $memeq (param $a i32) (param $b i32) (param $n i32) (result i32)
    (local $i i32)
    (block $b
      (loop $l
        (br_if $b (i32.ge_u (local.get $i) (local.get $n)))
        (if (i32.ne (i32.load8_u (i32.add (local.get $a) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $b) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (i32.const 1))

  (func (export "process")
        (param $in i32) (param $in_len i32) (param $env i32) (param $env_len i32)
        (result i32)
    (local $p i32) (local $end i32) (local $e i32) (local $eq i32)
    (local $count i32) (local $dst i32)
    (local.set $end (i32.add (local.get $env) (local.get $env_len)))

    ;; pass 1: count entries, log "env-reader: N entries"
    (local.set $p (local.get $env))
    (block $b
      (loop $l
        (br_if $b (i32.ge_u (local.get $p) (local.get $end)))
        (local.set $e (call $find (local.get $p) (local.get $end) (i32.const 0)))
        (if (i32.gt_u (local.get $e) (local.get $p))
          (then (local.set $count (i32.add (local.get $count) (i32.const 1)))))
        (local.set $p (i32.add (local.get $e) (i32.const 1)))
        (br $l)))
    (memory.copy (i32.const 256) (i32.const 32) (i32.const 12))
    (local.set $dst (call $utoa (i32.const 268) (local.get $count)))
    (memory.copy (local.get $dst) (i32.const 48) (i32.const 8))
    (call $log (i32.const 256)
               (i32.sub (i32.add (local.get $dst) (i32.const 8)) (i32.const 256)))

    ;; pass 2
    (local.set $p (local.get $env))
    (block $b
      (loop $l
        (br_if $b (i32.ge_u (local.get $p) (local.get $end)))
        (local.set $e (call $find (local.get $p) (local.get $end) (i32.const 0)))
        (if (i32.gt_u (local.get $e) (local.get $p))
          (then
            (if (i32.eqz (local.get $in_len))
              (then
                ;; list mode: "KEY=VALUE\n"
                (call $output (local.get $p) (i32.sub (local.get $e) (local.get $p)))
                (call $output (i32.const 16) (i32.const 1)))
              (else
                ;; lookup mode
                (local.set $eq (call $find (local.get $p) (local.get $e) (i32.const 61))) ;; '='
                (if (i32.and
                      (i32.lt_u (local.get $eq) (local.get $e))
                      (i32.eq (i32.sub (local.get $eq) (local.get $p)) (local.get $in_len)))
                  (then
                    (if (call $memeq (local.get $p) (local.get $in) (local.get $in_len))
                      (then
                        (local.set $eq (i32.add (local.get $eq) (i32.const 1)))
                        (if (i32.gt_u (local.get $e) (local.get $eq))
                          (then (call $output (local.get $eq)
                                              (i32.sub (local.get $e) (local.get $eq)))))
                        (return (i32.const 0))))))))))
        (local.set $p (i32.add (local.get $e) (i32.const 1)))
        (br $l)))
    (if (result i32) (local.get $in_len)
      (then (i32.const 2))    ;; key not found
      (else (i32.const 0))))
)
