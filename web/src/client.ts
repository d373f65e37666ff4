/** The high-level client: the operations of the Python ``KeymgmtClient`` over any Transport
 * (a WebSocket in the browser), on the sans-I/O core. One connection carries any number of
 * sessions; when it drops, the client reconnects and resumes every established session without
 * a new login (NET-2), and requests in flight are answered exactly once.
 *
 *     const client = new KeymgmtClient(webSocketConnector("wss://keys.example:7444/keymgmt"),
 *                                      { localStore: await IndexedDbStore.open() });
 *     await client.register("alice@example.org", password);
 *     const session = await client.login("alice@example.org", password);
 *     const keyId = await session.generate();
 *     const secret = await session.retrieve(keyId, Context.LOCAL_ONLY);
 *     await session.logout();
 *
 * ``export_key`` and ``storage_key`` stay in memory (in the session) and are wiped at logout;
 * the local store gets ciphertexts only. Errors are KeymgmtError subclasses with one line of
 * text that never carries a secret. */

import { DecodeError, ctEqual, toHex, utf8 } from "./core/bytes.js";
import { AuditType, Context, ErrorCode, KEY_ID_SIZE, MAX_PASSWORD_SIZE, Op, Status } from "./core/constants.js";
import { ClientConnection, ClientSession, State, type ClientEvent } from "./core/connection.js";
import type { RandomSource } from "./core/crypto.js";
import { IntegrityFailure, LabelError, LocalProtocolError, OperationRefused } from "./core/errors.js";
import type { OpaqueClient } from "./core/opaque.js";
import type { PasswordCheck } from "./core/passwordcheck.js";
import { PortableError, decodeResponse, encodeRequest, type AuditHead, type ChainedAuditEntry } from "./core/ops.js";
import { SecretOps, type LabeledKey, type Plan, type SealedCopy, type VerifiedAudit } from "./core/secretops.js";
import { opaqueReady, serenityOpaque } from "./opaque.js";
import { MemoryStore, type LocalStore } from "./store.js";
import type { Connector, Transport } from "./transport.js";

export class KeymgmtError extends Error {
  override name = "KeymgmtError";
}
/** Wrong password or unknown account (deliberately indistinguishable, NET-9). */
export class AuthenticationError extends KeymgmtError {
  override name = "AuthenticationError";
}
/** Too many login attempts for this account; ``retryAfter`` is the key server's wait in seconds. */
export class ThrottledError extends KeymgmtError {
  override name = "ThrottledError";
  constructor(
    message: string,
    readonly retryAfter: number | null = null,
  ) {
    super(message);
  }
}
/** Too many registration, login or resumption attempts from this address (NET-13); or an
 * operation the key server kept refusing because the account's requests went faster than its
 * per-user rate (the client sends it again for ``rateLimitWaitMs`` first). */
export class RateLimitedError extends ThrottledError {
  override name = "RateLimitedError";
}
/** Registration refused (name taken or not allowed, invitation missing); ``code`` says which. */
export class RegistrationError extends KeymgmtError {
  override name = "RegistrationError";
  constructor(
    message: string,
    readonly code: ErrorCode,
  ) {
    super(message);
  }
}
/** The session is over (logout, idle timeout, lifetime, request limit, password change). */
export class SessionEndedError extends KeymgmtError {
  override name = "SessionEndedError";
  constructor(
    message: string,
    readonly code: ErrorCode,
  ) {
    super(message);
  }
}
export class ConnectionLostError extends KeymgmtError {
  override name = "ConnectionLostError";
}
/** The client is closed for good (closed, or no reconnection within its budget). */
export class ClientClosedError extends ConnectionLostError {
  override name = "ClientClosedError";
}
export class NotFoundError extends KeymgmtError {
  override name = "NotFoundError";
}
export class RequestRefusedError extends KeymgmtError {
  override name = "RequestRefusedError";
  constructor(
    message: string,
    readonly status: Status,
  ) {
    super(message);
  }
}
/** Data from the key server failed verification. */
export class IntegrityError extends KeymgmtError {
  override name = "IntegrityError";
}
/** Named keys: a label names several keys, or is already another key's (nothing sent). */
export class LabelConflictError extends KeymgmtError {
  override name = "LabelConflictError";
}

const RETRY_IN = /retry in ([0-9]{1,9}) s$/;

/** Why a session ended with CLOSE(NOT_AUTHORIZED) (docs/protocol.md section 12.13): the key
 * server cannot say which of the two, and either way a fresh login is the way on. */
export const SESSION_REVOKED =
  "session ended: the account's password was changed after this session logged in, or the account was deleted; log in again";

/** NOT_FOUND to an operation that names no key: only the session's account can be gone (a key
 * server of the release before; this one ends such a session instead, section 12.13). */
export const NO_ACCOUNT = "the account does not exist (it was deleted)";

/** Why the key server refuses a password change or an account deletion INVALID (section 12.13). */
export const NOT_RECENT_LOGIN =
  "request refused: a password change or an account deletion needs a recent login (within the key server's sessions.reauth_window, 5 minutes by default), and this session's login is older; log in again";

/** The operations on one existing key: their NOT_FOUND means no such key. */
const ABOUT_A_KEY: ReadonlySet<Op> = new Set([Op.RETRIEVE, Op.DELETE_KEY, Op.RENAME_KEY]);
/** The operations the key server accepts only in a session with a recent login. */
const NEEDING_A_RECENT_LOGIN: ReadonlySet<Op> = new Set([Op.CHANGE_PASSWORD_START, Op.CHANGE_PASSWORD_FINISH, Op.DELETE_ACCOUNT]);

/** A listed key's label as a listing shows it (as ``keymgmt list`` does): ``<tampered>`` for a
 * label that did not open, "" for none. */
export function labelText(key: LabeledKey): string {
  if (key.labelTampered) return "<tampered>";
  return key.label ?? "";
}

/** The warning a listing with tampered labels comes with (as ``keymgmt list`` prints it), or null. */
export function tamperedLabelsWarning(keys: LabeledKey[]): string | null {
  const tampered = keys.filter((k) => k.labelTampered).length;
  if (tampered === 0) return null;
  return `${tampered} label(s) failed verification (altered on the key server, or moved from another key); those keys are listed by id only`;
}

function codeName(code: ErrorCode): string {
  return (ErrorCode[code] ?? String(code)).toLowerCase().replace(/_/g, " ");
}

function sessionError(event: Extract<ClientEvent, { type: "failed" } | { type: "closed" }>): KeymgmtError {
  if (event.type === "closed") {
    if (event.code === ErrorCode.NOT_AUTHORIZED) return new SessionEndedError(SESSION_REVOKED, event.code);
    return new SessionEndedError(`session ended: ${codeName(event.code)}`, event.code);
  }
  switch (event.code) {
    case ErrorCode.AUTHENTICATION_FAILED:
      return new AuthenticationError("login failed: wrong password or unknown account");
    case ErrorCode.THROTTLED: {
      const wait = RETRY_IN.exec(event.reason);
      if (wait) return new ThrottledError(`too many failed logins for this account; try again in ${wait[1]} s`, Number(wait[1]));
      return new ThrottledError("too many login attempts for this account; try again in a moment");
    }
    case ErrorCode.RATE_LIMITED:
      return new RateLimitedError("too many attempts from this address; try again in a few seconds");
    case ErrorCode.ACCOUNT_EXISTS:
      return new RegistrationError("registration refused: account name already registered", event.code);
    case ErrorCode.INVALID_ACCOUNT_NAME:
      return new RegistrationError("registration refused: account name not allowed", event.code);
    case ErrorCode.NOT_AUTHORIZED:
      return new RegistrationError("registration refused: the key server asks for a valid invitation", event.code);
    case ErrorCode.UNKNOWN_SESSION:
      return new SessionEndedError("the session could not be resumed (ended or expired); log in again", event.code);
    case ErrorCode.CONNECTION_LOST:
      return new ConnectionLostError(`connection to the key server lost: ${event.reason}`);
    default:
      return new SessionEndedError(`session failed: ${codeName(event.code)}`, event.code);
  }
}

interface Deferred<T> {
  promise: Promise<T>;
  resolve(value: T): void;
  reject(error: Error): void;
  settled: boolean;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (error: Error) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  const d: Deferred<T> = {
    promise,
    settled: false,
    resolve: (value) => {
      if (!d.settled) {
        d.settled = true;
        resolve(value);
      }
    },
    reject: (error) => {
      if (!d.settled) {
        d.settled = true;
        reject(error);
      }
    },
  };
  promise.catch(() => undefined); // a rejection nobody awaits is not an unhandled one
  return d;
}

/** Milliseconds a client keeps trying to reconnect before it closes. */
export const DEFAULT_RECONNECT_BUDGET_MS = 30_000;

export interface ClientOptions {
  localStore?: LocalStore;
  random?: RandomSource;
  opaque?: OpaqueClient;
  /** Resolves once ``opaque`` can be used (default: the WASM module's ``ready``). */
  opaqueReady?: Promise<void>;
  /** Milliseconds since the Unix epoch (for the local store's ``created``). */
  clock?: () => number;
  reconnectBudgetMs?: number;
  reconnectDelayMs?: number;
  reconnectMaxDelayMs?: number;
  reconnectAttempts?: number | null;
  jitter?: () => number;
  maxPayload?: number;
  maxInFlight?: number;
  /** How long an operation keeps sending a request again while the key server answers it
   * RATE_LIMITED (its per-user rate; nothing was done), after waits doubling from 50 ms to
   * 1 s; then RateLimitedError (default 30,000). */
  rateLimitWaitMs?: number;
}

const defaultRandom: RandomSource = (n) => globalThis.crypto.getRandomValues(new Uint8Array(n));
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
/** Whether a response body is the key server's RATE_LIMITED answer (one byte, nothing done). */
const isRateLimited = (body: Uint8Array): boolean => body.length === 1 && body[0] === Status.RATE_LIMITED;

function nameBytes(accountName: string | Uint8Array): Uint8Array {
  return typeof accountName === "string" ? utf8(accountName) : accountName;
}

function checkPassword(password: string): void {
  const size = utf8(password).length;
  if (size > MAX_PASSWORD_SIZE) throw new KeymgmtError(`a password is at most ${MAX_PASSWORD_SIZE} bytes, not ${size}`);
}

/** The pauses between reconnection attempts: capped exponential backoff, times 0.5..1 jitter. */
export function* reconnectDelays(first: number, cap: number, jitter: () => number): Generator<number, never> {
  let base = first;
  for (;;) {
    yield Math.min(cap, base) * (0.5 + 0.5 * jitter());
    base = Math.min(cap, base * 2);
  }
}

export class KeymgmtClient {
  readonly localStore: LocalStore;
  /** Bumped on every (re)connection. */
  connectionCount = 0;
  reconnectBudgetMs: number;
  private readonly random: RandomSource;
  private readonly opaque: OpaqueClient;
  private readonly opaqueReady: Promise<void>;
  private readonly clock: () => number;
  private readonly options: ClientOptions;
  private conn: ClientConnection;
  private transport: Transport | null = null;
  private connected: Deferred<void> = deferred();
  private connecting: Promise<void> | null = null;
  private closed: KeymgmtError | null = null;
  private readonly sessionWaiters = new Map<ClientSession, Deferred<ClientEvent>>();
  private readonly requestWaiters = new Map<ClientSession, Map<number, Deferred<Uint8Array>>>();
  private readonly slotWaiters = new Map<ClientSession, (() => void)[]>();
  private readonly answered = new Set<ClientSession>();
  /** Established sessions of this client (logged out by ``close``). */
  private readonly sessions = new Set<ClientSession>();
  private readonly ended = new Map<ClientSession, KeymgmtError>();
  /** The KeySession of each live session, told when it ends (it wipes its keys and answers
   * nothing more, not even from the local store). */
  private readonly keySessions = new Map<ClientSession, KeySession>();
  private readonly loginTurns = new Map<string, Promise<unknown>>();
  private detached: ClientSession[] = [];
  private deferredRounds = 0;
  private resumeTimer: ReturnType<typeof setTimeout> | null = null;

  constructor(
    private readonly connector: Connector,
    options: ClientOptions = {},
  ) {
    this.options = options;
    this.localStore = options.localStore ?? new MemoryStore();
    this.random = options.random ?? defaultRandom;
    this.opaque = options.opaque ?? serenityOpaque;
    this.opaqueReady = options.opaqueReady ?? (options.opaque ? Promise.resolve() : opaqueReady);
    this.clock = options.clock ?? Date.now;
    this.reconnectBudgetMs = options.reconnectBudgetMs ?? DEFAULT_RECONNECT_BUDGET_MS;
    this.conn = this.newConnection();
  }

  toString(): string {
    return `<KeymgmtClient ${this.connectionCount} connections>`;
  }

  private newConnection(): ClientConnection {
    return new ClientConnection(this.opaque, this.random, { maxPayload: this.options.maxPayload, maxInFlight: this.options.maxInFlight });
  }

  // ------------------------------------------------------------ public API

  /** Open the first connection (the other calls do it when needed). */
  async connect(): Promise<void> {
    await this.ready();
  }

  /** Register a new account (NET-5, REG-3); its user_id. ``invitation``: a token the key server asks for (REG-5). */
  async register(accountName: string | Uint8Array, password: string, options: { invitation?: Uint8Array | string } = {}): Promise<Uint8Array> {
    checkPassword(password);
    const name = nameBytes(accountName);
    const token = typeof options.invitation === "string" ? utf8(options.invitation) : (options.invitation ?? new Uint8Array(0));
    const event = await this.openRetrying(() => this.conn.openRegistration(name, password, token));
    if (event.type !== "registered") throw new KeymgmtError("registration did not complete");
    return event.userId;
  }

  /** Open a request session (NET-6). Logins of one account take turns (NET-10 counts each). */
  async login(accountName: string | Uint8Array, password: string): Promise<KeySession> {
    checkPassword(password);
    const name = nameBytes(accountName);
    const event = await this.loginTurn(toHex(name), () => this.openRetrying(() => this.conn.openRequestSession(name, password)));
    if (event.type !== "established") throw new KeymgmtError("login did not complete");
    const session = new KeySession(this, event.session, event.userId, event.exportKey, event.passwordCheck);
    const ended = this.ended.get(event.session);
    if (ended !== undefined) session.sessionEnded(ended); // ended before this call saw it established
    else this.keySessions.set(event.session, session);
    return session;
  }

  /** Change the password: a fresh login proves the current one, the change runs in it, then
   * logout. A new password equal to the current one, or an empty one, is refused before
   * anything is sent. */
  async changePassword(accountName: string | Uint8Array, currentPassword: string, newPassword: string): Promise<void> {
    if (!newPassword) throw new KeymgmtError("invalid argument: the new password must not be empty");
    if (ctEqual(utf8(newPassword), utf8(currentPassword))) throw new KeymgmtError("invalid argument: the new password is the current one");
    const session = await this.login(accountName, currentPassword);
    try {
      await session.changePassword(newPassword);
    } finally {
      await session.logout().catch(() => undefined);
    }
  }

  /** Delete the account (record, secrets, audit log) after a fresh login; drops the local copies. */
  async deleteAccount(accountName: string | Uint8Array, password: string): Promise<void> {
    const session = await this.login(accountName, password);
    await session.deleteAccount();
  }

  /** Log out of every session, say GOAWAY, close the transport; later calls raise ClientClosedError. */
  async close(): Promise<void> {
    if (this.closed !== null) return;
    if (this.transport !== null && this.conn.failed === null) {
      for (const session of this.sessions) {
        const id = this.conn.sessionId(session);
        if (id !== undefined && session.state === State.ESTABLISHED) this.conn.closeSession(id);
      }
      this.conn.close("client closing");
      this.flush();
    }
    this.shutDown(new ClientClosedError("client closed; open a new client"));
  }

  /** Send one request body on a session and wait for its answer (the KeySession methods use it). */
  async request(session: ClientSession, body: Uint8Array): Promise<Uint8Array> {
    for (;;) {
      await this.ready();
      const ended = this.ended.get(session);
      if (ended) throw ended;
      const id = this.conn.sessionId(session);
      if (id === undefined) {
        if (session.state === State.DETACHED) {
          await sleep(50); // its resumption was deferred (RATE_LIMITED): it is resumed again soon
          continue;
        }
        throw new SessionEndedError("session ended", ErrorCode.CLIENT_CLOSED);
      }
      if (session.inFlight.size >= this.conn.maxInFlight) {
        await new Promise<void>((resolve) => {
          const list = this.slotWaiters.get(session) ?? [];
          list.push(resolve);
          this.slotWaiters.set(session, list);
        });
        continue;
      }
      let requestId: number;
      try {
        requestId = this.conn.sendRequest(id, body);
      } catch (error) {
        if (error instanceof LocalProtocolError) throw new KeymgmtError(error.message);
        throw error;
      }
      const waiter = deferred<Uint8Array>();
      let waiters = this.requestWaiters.get(session);
      if (!waiters) this.requestWaiters.set(session, (waiters = new Map()));
      waiters.set(requestId, waiter);
      this.flush();
      return waiter.promise;
    }
  }

  /** ``request``, sent again while the key server answers RATE_LIMITED (its per-user rate:
   * nothing was done) for up to ``rateLimitWaitMs``; then RateLimitedError. */
  async requestPaced(session: ClientSession, body: Uint8Array): Promise<Uint8Array> {
    let answer = await this.request(session, body);
    if (!isRateLimited(answer)) return answer;
    const budget = this.options.rateLimitWaitMs ?? 30_000;
    const deadline = Date.now() + budget;
    const jitter = this.options.jitter ?? Math.random;
    for (let delay = 50; ; delay = Math.min(delay * 2, 1000)) {
      const wait = delay * (0.5 + 0.5 * jitter());
      if (Date.now() + wait > deadline) {
        throw new RateLimitedError(`the key server refused this account's requests for going faster than its per-user rate, for ${budget / 1000} s; try again later`);
      }
      await sleep(wait);
      answer = await this.request(session, body);
      if (!isRateLimited(answer)) return answer;
    }
  }

  /** Log out of a session (CLOSE CLIENT_CLOSED). */
  async closeSession(session: ClientSession): Promise<void> {
    await this.ready();
    if (this.ended.has(session)) return;
    const id = this.conn.sessionId(session);
    if (id === undefined) return;
    try {
      this.conn.closeSession(id);
    } catch (error) {
      if (error instanceof LocalProtocolError) throw new KeymgmtError(error.message);
      throw error;
    }
    this.failSession(session, new SessionEndedError("logged out", ErrorCode.CLIENT_CLOSED));
    this.flush();
  }

  /** Drop a session on this side (the account was deleted). */
  forgetSession(session: ClientSession, error: KeymgmtError): void {
    this.failSession(session, error);
  }

  get opaqueClient(): OpaqueClient {
    return this.opaque;
  }

  get randomSource(): RandomSource {
    return this.random;
  }

  now(): number {
    return this.clock();
  }

  // ------------------------------------------------------------ internals

  private checkOpen(): void {
    if (this.closed !== null) throw new ClientClosedError(this.closed.message);
  }

  /** Resolve once there is a live connection (opening or reopening one if needed). */
  private async ready(): Promise<void> {
    for (;;) {
      this.checkOpen();
      if (this.transport !== null && this.conn.failed === null && this.connected.settled) return;
      if (this.connecting === null) this.connecting = this.reconnect().finally(() => (this.connecting = null));
      await this.connecting;
    }
  }

  private async loginTurn<T>(account: string, action: () => Promise<T>): Promise<T> {
    const before = this.loginTurns.get(account) ?? Promise.resolve();
    const mine = before.then(action, action);
    const tail = mine.catch(() => undefined);
    this.loginTurns.set(account, tail);
    try {
      return await mine;
    } finally {
      if (this.loginTurns.get(account) === tail) this.loginTurns.delete(account);
    }
  }

  /** Open a session and wait for its outcome; once more on a new connection when the
   * connection was lost before the server answered its first frame. */
  private async openRetrying(open: () => number): Promise<ClientEvent> {
    await this.opaqueReady;
    for (let attempt = 1; ; attempt++) {
      await this.ready();
      let id: number;
      try {
        id = open();
      } catch (error) {
        if (error instanceof LocalProtocolError) throw new KeymgmtError(error.message);
        throw error;
      }
      const session = this.conn.session(id)!;
      const waiter = deferred<ClientEvent>();
      this.sessionWaiters.set(session, waiter);
      this.flush();
      try {
        return await waiter.promise;
      } catch (error) {
        const answered = this.answered.has(session);
        if (!(error instanceof ConnectionLostError) || error instanceof ClientClosedError || answered || attempt === 2) throw error;
      } finally {
        this.sessionWaiters.delete(session);
        this.answered.delete(session);
      }
    }
  }

  /** Send what the core queued, then act on its events. */
  private flush(): void {
    const frames = this.conn.framesToSend();
    if (this.transport !== null) for (const frame of frames) this.transport.send(frame);
    for (const event of this.conn.takeEvents()) this.dispatch(event);
    // the events may have queued more (an OPAQUE step's frames are flushed by the step)
    const more = this.conn.framesToSend();
    if (this.transport !== null) for (const frame of more) this.transport.send(frame);
  }

  private failSession(session: ClientSession, error: KeymgmtError): void {
    this.ended.set(session, error);
    this.keySessions.get(session)?.sessionEnded(error);
    this.keySessions.delete(session);
    this.sessions.delete(session);
    while (this.ended.size > 1024) this.ended.delete(this.ended.keys().next().value!);
    this.sessionWaiters.get(session)?.reject(error);
    for (const waiter of this.requestWaiters.get(session)?.values() ?? []) waiter.reject(error);
    this.requestWaiters.delete(session);
    for (const wake of this.slotWaiters.get(session) ?? []) wake();
    this.slotWaiters.delete(session);
    this.detached = this.detached.filter((s) => s !== session);
  }

  private dispatch(event: ClientEvent): void {
    switch (event.type) {
      case "opaque_step": {
        this.answered.add(event.session);
        const conn = this.conn;
        // Argon2 runs here; a macrotask first so the page can paint what happened so far
        setTimeout(() => {
          if (conn !== this.conn) return; // its connection failed meanwhile
          conn.completeOpaqueStep(event.sessionId);
          this.flush();
        }, 0);
        return;
      }
      case "established":
        this.sessions.add(event.session);
        this.sessionWaiters.get(event.session)?.resolve(event);
        return;
      case "registered":
        this.sessionWaiters.get(event.session)?.resolve(event);
        return;
      case "response": {
        const waiters = this.requestWaiters.get(event.session);
        waiters?.get(event.requestId)?.resolve(event.body);
        waiters?.delete(event.requestId);
        const wake = this.slotWaiters.get(event.session)?.shift();
        wake?.();
        return;
      }
      case "failed":
      case "closed":
        this.failSession(event.session, sessionError(event));
        return;
      case "resumed":
        this.deferredRounds = 0;
        return;
      case "resume_deferred":
        this.scheduleDeferredResume();
        return;
      case "connection_failed":
        this.onConnectionFailed(event.reason);
        return;
    }
  }

  /** The key server refused some RESUMEs unseen (RATE_LIMITED): resume them again after a pause. */
  private scheduleDeferredResume(): void {
    if (this.resumeTimer !== null) return;
    const attempts = this.options.reconnectAttempts ?? 5;
    this.deferredRounds += 1;
    const conn = this.conn;
    if (this.deferredRounds > attempts) {
      for (const session of conn.takeDetachedSessions()) this.failSession(session, new RateLimitedError("too many attempts from this address; the session could not be resumed"));
      return;
    }
    const delay = Math.min(this.options.reconnectMaxDelayMs ?? 5000, (this.options.reconnectDelayMs ?? 100) * 2 ** this.deferredRounds);
    this.resumeTimer = setTimeout(() => {
      this.resumeTimer = null;
      if (conn !== this.conn || conn.failed !== null) return;
      for (const session of conn.takeDetachedSessions()) if (!this.ended.has(session)) conn.resumeSession(session);
      this.flush();
    }, delay);
  }

  private onConnectionFailed(reason: string): void {
    this.detached.push(...this.conn.takeDetachedSessions());
    this.connected = deferred();
    const transport = this.transport;
    this.transport = null;
    if (transport !== null) {
      transport.onData = null;
      transport.onClose = null;
      transport.close();
    }
    // Sessions still opening have failed (their events came first); the detached ones wait.
    if (this.closed === null && this.detached.length > 0 && this.connecting === null) {
      this.connecting = this.reconnect().finally(() => (this.connecting = null));
      this.connecting.catch(() => undefined);
    }
    void reason;
  }

  /** Open a new connection and resume every detached session on it; close the client when the
   * reconnect budget is spent. */
  private async reconnect(): Promise<void> {
    this.checkOpen();
    const budget = this.reconnectBudgetMs;
    const started = Date.now();
    const delays = reconnectDelays(this.options.reconnectDelayMs ?? 100, this.options.reconnectMaxDelayMs ?? 5000, this.options.jitter ?? Math.random);
    let attempts = 0;
    let transport: Transport;
    for (;;) {
      attempts += 1;
      try {
        transport = await this.connector();
        break;
      } catch (error) {
        const remaining = budget - (Date.now() - started);
        const cap = this.options.reconnectAttempts ?? null;
        if (this.connectionCount === 0) {
          // the first connection: say so at once; the next call tries again
          throw new ConnectionLostError(`cannot connect to the key server: ${(error as Error).message}`);
        }
        if (remaining <= 0 || (cap !== null && attempts >= cap)) {
          const spent = remaining <= 0 ? `within ${budget / 1000} s` : `in ${attempts} attempts`;
          const closing = new ClientClosedError(`client closed: could not reconnect to the key server ${spent} (last error: ${(error as Error).message}); open a new client`);
          this.shutDown(closing);
          throw closing;
        }
        await sleep(Math.min(delays.next().value, remaining));
      }
      this.checkOpen();
    }
    if (this.closed !== null) {
      transport.close();
      this.checkOpen();
    }
    this.conn = this.newConnection();
    this.transport = transport;
    this.connectionCount += 1;
    const conn = this.conn;
    transport.onData = (data) => {
      if (conn !== this.conn) return;
      conn.receiveData(data);
      this.flush();
    };
    transport.onClose = (why) => {
      if (conn !== this.conn) return;
      conn.connectionLost(why);
      this.flush();
    };
    const detached = this.detached;
    this.detached = [];
    for (const session of detached) if (!this.ended.has(session) && session.state === State.DETACHED) conn.resumeSession(session);
    this.connected.resolve();
    this.flush();
  }

  private shutDown(error: KeymgmtError): void {
    this.closed = error;
    if (this.resumeTimer !== null) clearTimeout(this.resumeTimer);
    for (const session of [...this.sessionWaiters.keys(), ...this.requestWaiters.keys(), ...this.detached, ...this.sessions]) this.failSession(session, error);
    this.connected.reject(error);
    const transport = this.transport;
    this.transport = null;
    if (transport !== null) {
      transport.onData = null;
      transport.onClose = null;
      transport.close();
    }
  }
}

/** An authenticated request session: the operations on secrets (OPS-1..OPS-8), with the
 * client's checks of docs/protocol.md section 12.10 (the core's SecretOps). */
export class KeySession {
  readonly #ops: SecretOps;
  #ended: KeymgmtError | null = null;

  constructor(
    private readonly client: KeymgmtClient,
    readonly session: ClientSession,
    readonly userId: Uint8Array,
    exportKey: Uint8Array,
    passwordCheck: PasswordCheck | null = null,
  ) {
    this.#ops = new SecretOps(userId, exportKey, client.randomSource, passwordCheck);
  }

  toString(): string {
    return `<KeySession user_id=${toHex(this.userId)}>`;
  }

  /** Called by the client when the session ends (logout, expiry, a password change or
   * deletion, a lost resumption): its keys are wiped now, and every later call raises
   * ``error``, also one the local store could answer without the server. */
  sessionEnded(error: KeymgmtError): void {
    this.#ended = error;
    this.#ops.forget();
  }

  private async run<R>(plan: () => Plan<R>): Promise<R> {
    if (this.#ended !== null) throw this.#ended;
    let op: Op | null = null; // the last request sent: what a refusal answered
    try {
      const steps = plan();
      let step = steps.next();
      while (!step.done) {
        const request = step.value;
        op = request.op;
        const body = await this.client.requestPaced(this.session, encodeRequest(request));
        let answer;
        try {
          answer = decodeResponse(request.op, body);
        } catch (error) {
          if (error instanceof DecodeError) throw new IntegrityFailure("the key server's answer does not decode");
          throw error;
        }
        step = answer.status === Status.OK ? steps.next(answer.fields) : steps.throw(new OperationRefused(answer.status));
      }
      return step.value;
    } catch (error) {
      if (error instanceof KeymgmtError) throw error;
      if (error instanceof OperationRefused) {
        if (error.status === Status.NOT_FOUND) throw new NotFoundError(op !== null && ABOUT_A_KEY.has(op) ? "no such key" : NO_ACCOUNT);
        if (error.status === Status.INVALID && op !== null && NEEDING_A_RECENT_LOGIN.has(op)) throw new RequestRefusedError(NOT_RECENT_LOGIN, error.status);
        throw new RequestRefusedError(error.message, error.status);
      }
      if (error instanceof IntegrityFailure) throw new IntegrityError(error.message);
      if (error instanceof LabelError) throw error.notFound ? new NotFoundError(error.message) : new LabelConflictError(error.message);
      if (error instanceof PortableError) throw new KeymgmtError(`cannot import: ${error.message}`);
      if (error instanceof RangeError) throw new KeymgmtError(`invalid argument: ${error.message}`);
      throw error;
    }
  }

  private async keep(keyId: Uint8Array, copy: SealedCopy): Promise<void> {
    await this.client.localStore.put({ userId: this.userId, keyId, kind: copy.kind, ciphertext: copy.ciphertext, associatedData: copy.associatedData, created: Math.floor(this.client.now() * 1000) });
  }

  private async holds(): Promise<(keyId: Uint8Array) => boolean> {
    const held = new Set((await this.client.localStore.keyIds(this.userId)).map(toHex));
    return (keyId) => held.has(toHex(keyId));
  }

  /** OPS-2: a random 32-byte secret, stored sealed; its key id (named with ``label``). */
  async generate(label: string | null = null): Promise<Uint8Array> {
    const holds = await this.holds();
    const { keyId, copy } = await this.run(() => this.#ops.generate(holds, label));
    await this.keep(keyId, copy);
    return keyId;
  }

  /** OPS-3/OPS-12: store a secret given in the portable form (``len || secret``, or the long form). */
  async importSecret(portable: Uint8Array, label: string | null = null): Promise<Uint8Array> {
    const holds = await this.holds();
    const { keyId, copy } = await this.run(() => this.#ops.importPortable(portable, holds, label));
    await this.keep(keyId, copy);
    return keyId;
  }

  /** OPS-4: NULL -> null on success; LOCAL_ONLY -> the secret; EXPORT -> the portable form.
   * A verified local copy answers without asking the server. */
  async retrieve(keyId: Uint8Array, context: Context = Context.NULL): Promise<Uint8Array | null> {
    const local = keyId.length === KEY_ID_SIZE ? await this.client.localStore.get(this.userId, keyId) : null;
    const copy: SealedCopy | null = local === null ? null : { kind: local.kind, ciphertext: local.ciphertext, associatedData: local.associatedData };
    let outcome;
    try {
      outcome = await this.run(() => this.#ops.retrieve(keyId, context, copy));
    } catch (error) {
      if (error instanceof NotFoundError && local !== null) await this.client.localStore.delete(this.userId, keyId);
      throw error;
    }
    if (outcome.keep !== null) await this.keep(keyId, outcome.keep);
    return outcome.result;
  }

  /** OPS-5: the secret in the portable format. */
  async export(keyId: Uint8Array): Promise<Uint8Array> {
    return (await this.retrieve(keyId, Context.EXPORT))!;
  }

  /** OPS-8: every key with kind, creation time (µs) and label. */
  async listKeys(): Promise<LabeledKey[]> {
    return this.run(() => this.#ops.listKeys());
  }

  /** OPS-8: delete a key on the server and locally (the local copy goes either way). */
  async delete(keyId: Uint8Array): Promise<void> {
    try {
      await this.run(() => this.#ops.delete(keyId));
    } finally {
      if (keyId.length === KEY_ID_SIZE) await this.client.localStore.delete(this.userId, keyId);
    }
  }

  /** OPS-6: matching audit entries, all pages; times in µs since the epoch. */
  async audit(auditType: AuditType = AuditType.ALL, keyIds: Uint8Array[] = [], after: bigint | null = null, before: bigint | null = null): Promise<ChainedAuditEntry[]> {
    return this.run(() => this.#ops.audit(auditType, keyIds, after, before));
  }

  /** The audit chain: read and check the whole log, also against the head verified before. */
  async verifyAudit(): Promise<VerifiedAudit> {
    const head = await this.client.localStore.auditHead(this.userId);
    const verified = await this.run(() => this.#ops.verifyAudit(head));
    if (verified.head !== null) await this.client.localStore.putAuditHead(this.userId, verified.head);
    return verified;
  }

  /** The newest audit entry this client verified (compare it with another device's). */
  async auditHead(): Promise<AuditHead | null> {
    return this.client.localStore.auditHead(this.userId);
  }

  /** Named keys: set or change the key's label (null removes it). Whether the key had a label
   * before: removing the label of a key that has none sends nothing and gives false. */
  async rename(keyId: Uint8Array, label: string | null): Promise<boolean> {
    return this.run(() => this.#ops.rename(keyId, label));
  }

  /** Named keys: the key id of the one key labelled ``label``. */
  async resolve(label: string): Promise<Uint8Array> {
    return this.run(() => this.#ops.resolve(label));
  }

  /** Change the password inside this session (the key server wants a recent login). */
  async changePassword(newPassword: string): Promise<void> {
    checkPassword(newPassword);
    await this.run(() => this.#ops.changePassword(newPassword, this.client.opaqueClient));
  }

  /** Delete the account on the server and this client's copies; the session ends with it. */
  async deleteAccount(): Promise<void> {
    await this.run(() => this.#ops.deleteAccount());
    await this.client.localStore.deleteUser(this.userId);
    this.#ops.forget();
    this.client.forgetSession(this.session, new SessionEndedError("the account was deleted", ErrorCode.NOT_AUTHORIZED));
  }

  /** Log out (CLOSE CLIENT_CLOSED) and wipe this session's keys. */
  async logout(): Promise<void> {
    try {
      await this.client.closeSession(this.session);
    } finally {
      this.#ops.forget();
    }
  }
}
