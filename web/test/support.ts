/** Shared test helpers: the vectors directory, exact JSON loading, a stand-in OPAQUE. */

import { readFileSync, readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { join } from "node:path";
import { fromHex } from "../src/core/bytes.js";
import type { OpaqueClient } from "../src/core/opaque.js";

/** tests/vectors of the repository (web/build/test/ -> ../../../tests/vectors), or $KEYMGMT_VECTORS. */
export const VECTORS_DIR = process.env.KEYMGMT_VECTORS ?? fileURLToPath(new URL("../../../tests/vectors/", import.meta.url));

export function vectorFiles(): string[] {
  return readdirSync(VECTORS_DIR)
    .filter((name) => !name.startsWith("."))
    .sort();
}

/** Load a vector file; an integer JSON cannot hold exactly is an error, not a rounding. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export function loadVector(name: string): any {
  const text = readFileSync(join(VECTORS_DIR, name), "utf-8");
  return JSON.parse(text, (_key, value: unknown) => {
    if (typeof value === "number" && Number.isInteger(value) && !Number.isSafeInteger(value)) {
      throw new Error(`${name}: integer ${value} is not exact as a JSON number here; read it as a 64-bit integer`);
    }
    return value;
  });
}

export const h = fromHex;

/** An OPAQUE stand-in: fixed-size messages, and a login that yields ``sessionKey``. */
export function fakeOpaque(sessionKey: Uint8Array, exportKey: Uint8Array = new Uint8Array(64).fill(7), loginOk = true): OpaqueClient {
  return {
    registrationStart: () => ({ state: "reg", request: new Uint8Array(32).fill(1) }),
    registrationFinish: () => ({ upload: new Uint8Array(192).fill(2), exportKey: exportKey.slice() }),
    loginStart: () => ({ state: "login", request: new Uint8Array(96).fill(3) }),
    loginFinish: () => (loginOk ? { finalization: new Uint8Array(64).fill(4), sessionKey: sessionKey.slice(), exportKey: exportKey.slice() } : null),
  };
}

/** Deterministic "random" bytes for tests (a counter); never for real keys. */
export function countingRandom(seed = 0): (n: number) => Uint8Array {
  let counter = seed;
  return (n) => {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = (counter++ * 131 + 7) & 0xff;
    return out;
  };
}
