/** The core's OpaqueClient on @serenity-kit/opaque (opaque-ke compiled to WASM). It speaks the
 * key server's OPAQUE (docs/protocol.md section 6: RFC 9807 OPAQUE-3DH, ristretto255, SHA-512)
 * only with the key server's Argon2id parameters, which @serenity-kit/opaque calls
 * ``argon2id-custom``: any other key stretching gives another export key and a login that
 * never succeeds. Await ``opaqueReady`` (the WASM module) before the first use. */

import * as opaque from "@serenity-kit/opaque";
import type { OpaqueClient } from "./core/opaque.js";

/** opaque-ke-py's fixed Argon2id parameters: t = 2, m = 19456 KiB, p = 1. */
export const KEY_STRETCHING = { "argon2id-custom": { iterations: 2, memory: 19456, parallelism: 1 } } as const;

export const opaqueReady: Promise<void> = opaque.ready;

function toBase64Url(bytes: Uint8Array): string {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function fromBase64Url(text: string): Uint8Array {
  const padded = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  const binary = atob(padded);
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

export const serenityOpaque: OpaqueClient = {
  registrationStart(password) {
    const { clientRegistrationState, registrationRequest } = opaque.client.startRegistration({ password });
    return { state: clientRegistrationState, request: fromBase64Url(registrationRequest) };
  },
  registrationFinish(password, state, response) {
    const result = opaque.client.finishRegistration({
      password,
      clientRegistrationState: state as string,
      registrationResponse: toBase64Url(response),
      keyStretching: KEY_STRETCHING,
    });
    return { upload: fromBase64Url(result.registrationRecord), exportKey: fromBase64Url(result.exportKey) };
  },
  loginStart(password) {
    const { clientLoginState, startLoginRequest } = opaque.client.startLogin({ password });
    return { state: clientLoginState, request: fromBase64Url(startLoginRequest) };
  },
  loginFinish(password, state, response) {
    const result = opaque.client.finishLogin({
      password,
      clientLoginState: state as string,
      loginResponse: toBase64Url(response),
      keyStretching: KEY_STRETCHING,
    });
    if (!result) return null;
    return {
      finalization: fromBase64Url(result.finishLoginRequest),
      sessionKey: fromBase64Url(result.sessionKey),
      exportKey: fromBase64Url(result.exportKey),
    };
  },
};

export { toBase64Url, fromBase64Url };
