/** The core (src/core/) stays sans-I/O: no network, storage, timers, clocks or ambient
 * randomness; it imports only its own modules and @noble's pure hash and cipher code. */

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { join } from "node:path";

const CORE = fileURLToPath(new URL("../../src/core/", import.meta.url));
const FORBIDDEN = [
  /\bDate\b/,
  /\bperformance\b/,
  /\bsetTimeout\b|\bsetInterval\b|\bsetImmediate\b|\bqueueMicrotask\b/,
  /\bMath\.random\b/,
  /\bgetRandomValues\b|\brandomBytes\b/,
  /\bfetch\b|\bWebSocket\b|\bXMLHttpRequest\b/,
  /\bindexedDB\b|\blocalStorage\b|\bsessionStorage\b/,
  /\bprocess\b|\brequire\(/,
  /\bconsole\./,
];

test("src/core imports nothing but itself and @noble, and reads no clock, timer or randomness of its own", () => {
  const files = readdirSync(CORE).filter((name) => name.endsWith(".ts"));
  assert.ok(files.length >= 10, `core files: ${files}`);
  for (const name of files) {
    const source = readFileSync(join(CORE, name), "utf-8");
    const code = source.replace(/\/\*[\s\S]*?\*\//g, "").replace(/\/\/.*$/gm, "").replace(/"(?:[^"\\\n]|\\.)*"|`(?:[^`\\]|\\.)*`/g, '""');
    for (const pattern of FORBIDDEN) assert.ok(!pattern.test(code), `${name} uses ${pattern}`);
    for (const [, from] of source.matchAll(/\bfrom\s+"([^"]+)"/g)) {
      assert.ok(from!.startsWith("./") || /^@noble\/(hashes|ciphers)\//.test(from!), `${name} imports ${from}`);
    }
  }
});
