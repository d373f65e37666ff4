/** Whether a new registration's password is the one a session logged in with, from public
 * values only (docs/protocol.md section 12.13; the Python core's keymgmt_proto.PasswordCheck).
 * A login's credential response (KE2) carries a masking nonce and the server's public key
 * XORed with the first 32 bytes of HKDF-Expand-SHA512(masking_key, nonce || "CredentialResponsePad");
 * the masking key depends only on the password and the server's OPRF key for the name. A new
 * registration's upload carries its masking key, and its response the server's public key. */

import { hmac } from "@noble/hashes/hmac.js";
import { sha512 } from "@noble/hashes/sha2.js";
import { ctEqual } from "./bytes.js";

const NPK = 32;
const NN = 32;
const NH = 64;
const PAD_INFO = new TextEncoder().encode("CredentialResponsePad");

function pad(maskingKey: Uint8Array, nonce: Uint8Array): Uint8Array {
  const info = new Uint8Array(NN + PAD_INFO.length + 1);
  info.set(nonce, 0);
  info.set(PAD_INFO, NN);
  info[info.length - 1] = 1; // HKDF-Expand's first block: its output is a prefix of any longer one
  return hmac(sha512, maskingKey, info).subarray(0, NPK);
}

function xor(a: Uint8Array, b: Uint8Array): Uint8Array {
  return a.map((byte, i) => byte ^ b[i]!);
}

/** The server's public key and the masking key of a RegistrationResponse and RegistrationUpload. */
function registrationParts(response: Uint8Array, upload: Uint8Array): [Uint8Array, Uint8Array] | null {
  if (response.length !== 2 * NPK || upload.length < NPK + NH) return null;
  return [response.subarray(NPK), upload.subarray(NPK, NPK + NH)];
}

export class PasswordCheck {
  readonly #nonce: Uint8Array;
  readonly #maskedServerKey: Uint8Array;

  private constructor(nonce: Uint8Array, maskedServerKey: Uint8Array) {
    this.#nonce = nonce;
    this.#maskedServerKey = maskedServerKey;
  }

  /** From a login's credential response (KE2); null when it is not OPAQUE's layout. */
  static fromLogin(credentialResponse: Uint8Array): PasswordCheck | null {
    if (credentialResponse.length < NPK + NN + NPK) return null;
    return new PasswordCheck(credentialResponse.slice(NPK, NPK + NN), credentialResponse.slice(NPK + NN, NPK + NN + NPK));
  }

  /** As a login with the registration's password would give (``nonce``: 32 fresh bytes). */
  static fromRegistration(response: Uint8Array, upload: Uint8Array, nonce: Uint8Array): PasswordCheck | null {
    const parts = registrationParts(response, upload);
    if (parts === null || nonce.length !== NN) return null;
    const [serverKey, maskingKey] = parts;
    return new PasswordCheck(nonce.slice(), xor(serverKey, pad(maskingKey, nonce)));
  }

  /** True if the registration is for the password of the login this check came from. */
  samePassword(response: Uint8Array, upload: Uint8Array): boolean {
    const parts = registrationParts(response, upload);
    if (parts === null) return false;
    const [serverKey, maskingKey] = parts;
    return ctEqual(xor(this.#maskedServerKey, pad(maskingKey, this.#nonce)), serverKey);
  }

  toString(): string {
    return "PasswordCheck()";
  }
}
