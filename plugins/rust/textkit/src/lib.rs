//! textkit: a wasm-core sample plugin in Rust for the core ABI (docs/plugin-abi.md, kind 1).
//!
//! Entries (all `(input_ptr, input_len, env_ptr, env_len) -> i32`):
//!
//! * `process`: word statistics of UTF-8 text as one line of JSON:
//!   `{"bytes":B,"chars":C,"words":W,"lines":L,"distinct":D,"top":[["word",n],...]}`.
//!   Words are runs of alphanumeric characters and `'`, lowercased (Unicode); `top` holds the
//!   `TOP` (env, default 3) most frequent, by count descending then word ascending.
//!   Returns 2 if `TOP` is not a number. Input that is not UTF-8 makes it panic: TRAP.
//! * `base64`: the input in standard base64 (with `=` padding).
//! * `repeat`: the input repeated `TIMES` (env, default 2) times, built in memory first, so a
//!   large `TIMES` under a small memory limit fails in the allocator (a trap). Returns 2 if
//!   `TIMES` is not a number.
//! * `spin`: loops forever, slowly burning fuel (for limit tests: TIMEOUT).
//!
//! Every panic is logged through `host.log` before the module traps, so the caller sees the
//! reason in the error's logs.

use std::alloc::{alloc as raw_alloc, handle_alloc_error, Layout};
use std::collections::HashMap;

// ---------------------------------------------------------------- host imports

#[link(wasm_import_module = "host")]
extern "C" {
    #[link_name = "output"]
    fn host_output(ptr: *const u8, len: usize);
    #[link_name = "log"]
    fn host_log(ptr: *const u8, len: usize);
}

/// Appends bytes to the execution's output (the host copies them during the call).
fn output(bytes: &[u8]) {
    unsafe { host_output(bytes.as_ptr(), bytes.len()) }
}

/// Adds one log line.
fn log(line: &str) {
    unsafe { host_log(line.as_ptr(), line.len()) }
}

// ---------------------------------------------------------------- ABI plumbing

/// Called by the host to place the input and the environment. The instance is thrown away
/// after one execution, so nothing is ever freed. When memory cannot grow the allocator
/// returns null and `handle_alloc_error` aborts: `unreachable`, a trap.
#[no_mangle]
pub extern "C" fn alloc(len: usize) -> *mut u8 {
    let layout = Layout::from_size_align(len.max(1), 1).unwrap_or_else(|_| std::process::abort());
    let ptr = unsafe { raw_alloc(layout) };
    if ptr.is_null() {
        handle_alloc_error(layout);
    }
    ptr
}

/// The bytes the host placed at `ptr`. A zero length may come with pointer 0, which must not
/// become a slice (a null slice pointer is undefined behaviour in Rust).
unsafe fn host_bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

/// The environment: `KEY=VALUE\0` entries, in the order given; values may contain `=`.
struct Env<'a>(Vec<(&'a [u8], &'a [u8])>);

impl<'a> Env<'a> {
    fn parse(raw: &'a [u8]) -> Self {
        let pairs = raw
            .split(|&b| b == 0)
            .filter(|entry| !entry.is_empty())
            .map(|entry| match entry.iter().position(|&b| b == b'=') {
                Some(eq) => (&entry[..eq], &entry[eq + 1..]),
                None => (entry, &entry[entry.len()..]),
            })
            .collect();
        Env(pairs)
    }

    fn get(&self, key: &str) -> Option<&'a [u8]> {
        self.0.iter().find(|(k, _)| *k == key.as_bytes()).map(|(_, v)| *v)
    }

    /// A numeric setting: `default` when absent, `Err` with a message when not a number.
    fn number(&self, key: &str, default: usize) -> Result<usize, String> {
        match self.get(key) {
            None => Ok(default),
            Some(raw) => std::str::from_utf8(raw)
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .ok_or_else(|| format!("{key} must be a non-negative integer, got {:?}",
                                       String::from_utf8_lossy(raw))),
        }
    }
}

/// Runs one entry: logs panics, decodes the arguments, maps `Err` to a logged non-zero code.
fn run(input: *const u8, input_len: usize, env: *const u8, env_len: usize,
       body: fn(&[u8], &Env) -> Result<(), (i32, String)>) -> i32 {
    log_panics();
    let (input, env) = unsafe { (host_bytes(input, input_len), host_bytes(env, env_len)) };
    match body(input, &Env::parse(env)) {
        Ok(()) => 0,
        Err((code, message)) => {
            log(&format!("textkit: {message}"));
            code
        }
    }
}

/// Sends the panic message to the log; with `panic = "abort"` the module then traps.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        match info.location() {
            Some(at) => log(&format!("textkit panicked at {}:{}: {message}", at.file(), at.line())),
            None => log(&format!("textkit panicked: {message}")),
        }
    }));
}

// ---------------------------------------------------------------- entries

#[no_mangle]
pub extern "C" fn process(input: *const u8, input_len: usize, env: *const u8, env_len: usize) -> i32 {
    run(input, input_len, env, env_len, word_stats)
}

#[no_mangle]
pub extern "C" fn base64(input: *const u8, input_len: usize, env: *const u8, env_len: usize) -> i32 {
    run(input, input_len, env, env_len, |input, _| {
        output(encode_base64(input).as_bytes());
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn repeat(input: *const u8, input_len: usize, env: *const u8, env_len: usize) -> i32 {
    run(input, input_len, env, env_len, |input, env| {
        let times = env.number("TIMES", 2).map_err(|message| (2, message))?;
        log(&format!("textkit: repeat {} bytes {times} times", input.len()));
        output(&input.repeat(times)); // one allocation of the whole result
        Ok(())
    })
}

/// Never returns: an empty `loop {}` (well defined in Rust) is a bare wasm `loop br`, one unit
/// of fuel per turn, so the wall-clock timeout ends it (TIMEOUT) long before the default fuel.
#[no_mangle]
pub extern "C" fn spin(_input: *const u8, _input_len: usize, _env: *const u8, _env_len: usize) -> i32 {
    #[allow(clippy::empty_loop)]
    loop {}
}

// ---------------------------------------------------------------- the work

fn word_stats(input: &[u8], env: &Env) -> Result<(), (i32, String)> {
    let top = env.number("TOP", 3).map_err(|message| (2, message))?;
    let text = std::str::from_utf8(input).expect("input must be UTF-8 text"); // panic: TRAP

    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut words = 0;
    for word in text.split(|c: char| !(c.is_alphanumeric() || c == '\'')).filter(|w| !w.is_empty()) {
        words += 1;
        *counts.entry(word.to_lowercase()).or_insert(0) += 1;
    }
    let lines = text.matches('\n').count() + usize::from(!text.is_empty() && !text.ends_with('\n'));

    let mut ranked: Vec<(&String, &usize)> = counts.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let top_json: Vec<String> = ranked
        .iter()
        .take(top)
        .map(|(word, count)| format!("[{},{count}]", json_string(word)))
        .collect();

    output(format!(
        "{{\"bytes\":{},\"chars\":{},\"words\":{words},\"lines\":{lines},\"distinct\":{},\"top\":[{}]}}",
        input.len(),
        text.chars().count(),
        counts.len(),
        top_json.join(","),
    ).as_bytes());
    log(&format!("textkit: {words} words, {} distinct", counts.len()));
    Ok(())
}

/// A JSON string literal (RFC 8259 escapes).
fn json_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            c if u32::from(c) < 0x20 => quoted.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

fn encode_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                encoded.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                encoded.push('=');
            }
        }
    }
    encoded
}
