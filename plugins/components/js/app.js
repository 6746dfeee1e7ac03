// A wasm-core plugin in JavaScript, built into a WebAssembly component by componentize-js.
//
// What it does: returns its input upper-cased (ASCII letters), followed by the value of the env
// variable SUFFIX when the request sets one, and logs one line. The inputs `fail`, `trap` and
// `loop` show how a plugin's failures look from the service: PLUGIN_ERROR, TRAP and TIMEOUT.
//
// Build: plugins/components/build.sh (docs/plugin-abi.md, "A plugin in JavaScript").
import { log } from 'wasm-core:plugin/host@0.1.0';

const encoder = new TextEncoder();

export function process(input, env) {
  log(`js plugin: ${input.length} bytes in`);
  const command = input.length <= 4 ? String.fromCharCode(...input) : '';
  if (command === 'fail') {
    throw 'asked to fail'; // a thrown string is the err of result<_, string>: PLUGIN_ERROR
  }
  if (command === 'trap') {
    throw { notAString: true }; // cannot be lowered as the err string: the call traps (TRAP)
  }
  if (command === 'loop') {
    for (;;) {} // stopped by the timeout (epoch) or fuel
  }
  const output = new Uint8Array(input);
  for (let i = 0; i < output.length; i++) {
    const c = output[i];
    if (c >= 97 && c <= 122) output[i] = c - 32;
  }
  const suffix = env.find(([key]) => key === 'SUFFIX');
  if (!suffix) return output;
  const tail = encoder.encode(suffix[1]);
  const joined = new Uint8Array(output.length + tail.length);
  joined.set(output);
  joined.set(tail, output.length);
  return joined;
}
