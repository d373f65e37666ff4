/** The OPAQUE client steps the core needs (docs/protocol.md section 6), as an interface: the
 * core stays free of any particular OPAQUE library. ``src/opaque.ts`` binds it to
 * @serenity-kit/opaque (opaque-ke in WASM); tests may inject a stand-in. */

export interface OpaqueRegistrationStart {
  /** Opaque client state for the finish step. */
  state: unknown;
  /** RegistrationRequest (32 bytes). */
  request: Uint8Array;
}

export interface OpaqueRegistrationFinish {
  /** RegistrationUpload (192 bytes). */
  upload: Uint8Array;
  /** 64 bytes. */
  exportKey: Uint8Array;
}

export interface OpaqueLoginStart {
  state: unknown;
  /** CredentialRequest, KE1 (96 bytes). */
  request: Uint8Array;
}

export interface OpaqueLoginFinish {
  /** CredentialFinalization, KE3 (64 bytes). */
  finalization: Uint8Array;
  /** 64 bytes each. */
  sessionKey: Uint8Array;
  exportKey: Uint8Array;
}

export interface OpaqueClient {
  registrationStart(password: string): OpaqueRegistrationStart;
  /** Throws when the server's RegistrationResponse is not valid. */
  registrationFinish(password: string, state: unknown, response: Uint8Array): OpaqueRegistrationFinish;
  loginStart(password: string): OpaqueLoginStart;
  /** Null when the login fails (wrong password, unknown account, forged response). */
  loginFinish(password: string, state: unknown, response: Uint8Array): OpaqueLoginFinish | null;
}
