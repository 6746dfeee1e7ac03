// An Extism plugin in AssemblyScript, built with @extism/as-pdk (see ../build.sh).
//
//   greet:  output "<greeting>, <input>!" where greeting is config "greeting" (default
//           "Hello"); logs one info line.
//   fail:   error_set("the input was refused: <input>") and status 1.
//   vars:   sets var "seen" to the input, reads it back, outputs "seen=<var>" (vars live for
//           one execution in wasm-core), then removes it.
//   spin:   loops forever (stopped by the execution's time limit).
import { Config, Host, LogLevel, Memory, Var } from "@extism/as-pdk";
import { error_set, log_error } from "@extism/as-pdk/lib/env";

// AssemblyScript calls this on a failed assertion or a thrown error: log it, then the
// runtime traps.
function myAbort(
  message: string | null,
  fileName: string | null,
  lineNumber: u32,
  columnNumber: u32,
): void {
  const text = (message === null ? "abort" : message) + " at " +
    (fileName === null ? "?" : fileName) + ":" + lineNumber.toString();
  log_error(Memory.allocateString(text).offset);
}

export function greet(): i32 {
  const name = Host.inputString();
  const configured = Config.get("greeting");
  const greeting = configured === null ? "Hello" : configured;
  Host.log(LogLevel.Info, "greet: greeting " + name);
  Host.outputString(greeting + ", " + name + "!");
  return 0;
}

export function fail(): i32 {
  Host.log(LogLevel.Warn, "fail: refusing");
  error_set(Memory.allocateString("the input was refused: " + Host.inputString()).offset);
  return 1;
}

export function vars(): i32 {
  Var.set("seen", Host.input());
  const seen = Var.getString("seen");
  Host.outputString("seen=" + (seen === null ? "null" : seen));
  Var.remove("seen");
  return 0;
}

export function spin(): i32 {
  let x: u64 = 0;
  while (true) {
    x += 1;
  }
  return <i32>x;
}
