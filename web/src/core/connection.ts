/** The client side of one keymgmt connection, sans-I/O (docs/protocol.md sections 3 to 9):
 * feed it the bytes that arrive (``receiveData``), send what ``dataToSend`` returns, and act on
 * the events ``takeEvents`` hands back. It carries any number of sessions (registration and
 * request sessions), and resumes sessions detached from an earlier connection. It has no
 * clock and does no I/O; randomness and OPAQUE are injected. */

import { concat, ctEqual, utf8 } from "./bytes.js";
import {
  ACCOUNT_NAME_MAX,
  DEFAULT_MAX_IN_FLIGHT,
  DEFAULT_MAX_PAYLOAD,
  ErrorCode,
  FrameType,
  KEY_SIZE,
  MAX_PASSWORD_SIZE,
  MAX_REQUEST_ID,
  MAX_SESSION_ID,
  MIN_MAX_PAYLOAD,
  NONCE_SIZE,
  OPAQUE_KEY_SIZE,
  REGISTRATION_TOKEN_MAX,
  RESUME_NONCE_SIZE,
} from "./constants.js";
import { Channel, masterKey, wrapStorageKey, type RandomSource } from "./crypto.js";
import { LocalProtocolError, ProtocolError } from "./errors.js";
import { FrameBuffer, encodeFrame, type Frame } from "./framing.js";
import {
  LoginFinishCodec,
  LoginResponseCodec,
  RegResponseCodec,
  RegUploadCodec,
  WelcomeCodec,
  cleanReason,
  decodeAbort,
  decodeClose,
  decodeRequestMessage,
  decodeResumed,
  decodeResumedEnvelope,
  encodeAbort,
  encodeClose,
  encodeCompleteRegistration,
  encodeLoginStart,
  encodeRegStart,
  encodeRequestMessage,
  encodeResume,
} from "./messages.js";
import type { OpaqueClient } from "./opaque.js";
import { PasswordCheck } from "./passwordcheck.js";

/** Client session states (the generated diagrams of docs/protocol.md section 8.4). */
export enum State {
  IDLE = "IDLE",
  AWAIT_REG_RESPONSE = "AWAIT_REG_RESPONSE",
  AWAIT_REG_STEP = "AWAIT_REG_STEP",
  AWAIT_LOGIN_RESPONSE = "AWAIT_LOGIN_RESPONSE",
  AWAIT_LOGIN_STEP = "AWAIT_LOGIN_STEP",
  AWAIT_WELCOME = "AWAIT_WELCOME",
  AWAIT_REG_CLOSE = "AWAIT_REG_CLOSE",
  ESTABLISHED = "ESTABLISHED",
  AWAIT_RESUMED = "AWAIT_RESUMED",
  CLOSE_AFTER_RESUMED = "CLOSE_AFTER_RESUMED",
  DETACHED = "DETACHED",
  CLOSED = "CLOSED",
}

export type SessionKind = "registration" | "request";

/** A session, and the application's handle to it: the same object on every connection the
 * session is resumed on. Its keys stay inside; nothing here is meant for display. */
export class ClientSession {
  state: State = State.IDLE;
  userId: Uint8Array | null = null;
  /** Requests sent (or held while waiting for RESUMED) and not yet answered: id -> body. */
  readonly inFlight = new Map<number, Uint8Array>();
  nextRequestId = 1;
  /** The session's channel (its keys are private to it). */
  channel: Channel | null = null;

  constructor(
    readonly kind: SessionKind,
    readonly accountName: Uint8Array,
  ) {}

  toString(): string {
    return `<ClientSession ${this.kind} ${this.state}>`;
  }
  toJSON(): string {
    return this.toString();
  }
}

/** What a session holds only while it opens or resumes: kept out of the session object so no
 * inspection, logging or serialization of it shows a password or key. */
interface SessionSecrets {
  password: string | null;
  opaqueState: unknown;
  serverMessage: Uint8Array | null;
  registrationExportKey: Uint8Array | null;
  resumeNonce: Uint8Array | null;
  /** From the login's credential response: tells a new password from this one (public). */
  passwordCheck: PasswordCheck | null;
}

const secretsOf = new WeakMap<ClientSession, SessionSecrets>();

function secrets(session: ClientSession): SessionSecrets {
  let held = secretsOf.get(session);
  if (held === undefined) {
    held = { password: null, opaqueState: null, serverMessage: null, registrationExportKey: null, resumeNonce: null, passwordCheck: null };
    secretsOf.set(session, held);
  }
  return held;
}

export type ClientEvent =
  /** The core needs an OPAQUE finish step (Argon2): call ``completeOpaqueStep(sessionId)``. */
  | { type: "opaque_step"; session: ClientSession; sessionId: number }
  /** A request session is established; ``exportKey`` is handed over once, with the check that
   * tells a new password from the login's (null when the OPAQUE messages are not OPAQUE's layout). */
  | { type: "established"; session: ClientSession; sessionId: number; userId: Uint8Array; exportKey: Uint8Array; passwordCheck: PasswordCheck | null }
  | { type: "registered"; session: ClientSession; sessionId: number; userId: Uint8Array }
  | { type: "response"; session: ClientSession; sessionId: number; requestId: number; body: Uint8Array }
  /** The session ended with an error (ABORT either way, a failed step, a lost handshake). */
  | { type: "failed"; session: ClientSession; sessionId: number; code: ErrorCode; reason: string; remote: boolean }
  /** The session ended with a sealed CLOSE (either side), or a held logout. */
  | { type: "closed"; session: ClientSession; sessionId: number; code: ErrorCode }
  | { type: "resumed"; session: ClientSession; sessionId: number }
  /** The server refused the RESUME unseen (RATE_LIMITED): the session is detached again. */
  | { type: "resume_deferred"; session: ClientSession; sessionId: number }
  | { type: "connection_failed"; code: ErrorCode; reason: string; remote: boolean };

export interface ConnectionOptions {
  maxPayload?: number;
  maxInFlight?: number;
}

export class ClientConnection {
  readonly maxPayload: number;
  readonly maxInFlight: number;
  /** Why the connection ended (null while it is usable). */
  failed: { code: ErrorCode; reason: string } | null = null;
  private readonly frames: FrameBuffer;
  private readonly live = new Map<number, ClientSession>();
  private readonly ids = new Map<ClientSession, number>();
  private highestId = 0;
  private outbox: Uint8Array[] = [];
  private events: ClientEvent[] = [];
  private detached: ClientSession[] = [];

  constructor(
    private readonly opaque: OpaqueClient,
    private readonly random: RandomSource,
    options: ConnectionOptions = {},
  ) {
    this.maxPayload = options.maxPayload ?? DEFAULT_MAX_PAYLOAD;
    this.maxInFlight = options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT;
    if (this.maxPayload < MIN_MAX_PAYLOAD) throw new RangeError("max_payload is at least 1024");
    if (this.maxInFlight < 1) throw new RangeError("max_in_flight is at least 1");
    this.frames = new FrameBuffer(this.maxPayload);
  }

  // ------------------------------------------------------------ I/O side

  /** Bytes to write to the transport, in order (and forget them). */
  dataToSend(): Uint8Array {
    const data = concat(...this.outbox);
    this.outbox = [];
    return data;
  }

  /** The same bytes as whole frames, one per array (for message transports like WebSocket). */
  framesToSend(): Uint8Array[] {
    const frames = this.outbox;
    this.outbox = [];
    return frames;
  }

  /** The events produced since the last call. */
  takeEvents(): ClientEvent[] {
    const events = this.events;
    this.events = [];
    return events;
  }

  receiveData(data: Uint8Array): void {
    if (this.failed !== null) return;
    let frames: Frame[];
    try {
      frames = this.frames.feed(data);
    } catch (error) {
      if (error instanceof ProtocolError) {
        this.failConnection(error.code, error.message, true, true);
        return;
      }
      throw error;
    }
    for (const frame of frames) {
      if (this.failed !== null) return;
      this.dispatch(frame);
    }
  }

  /** The transport went away: established sessions are detached for resumption. */
  connectionLost(reason = "connection lost"): void {
    if (this.failed === null) this.failConnection(ErrorCode.CONNECTION_LOST, reason, false, false);
  }

  /** End the connection on purpose: GOAWAY(OK); sessions stay resumable elsewhere. */
  close(reason = "client closing"): void {
    if (this.failed === null) this.failConnection(ErrorCode.OK, reason, false, true);
  }

  /** Sessions detached by the end of this connection (each once), to resume on another. */
  takeDetachedSessions(): ClientSession[] {
    const sessions = this.detached;
    this.detached = [];
    return sessions;
  }

  sessionId(session: ClientSession): number | undefined {
    return this.ids.get(session);
  }

  session(sessionId: number): ClientSession | undefined {
    return this.live.get(sessionId);
  }

  // ------------------------------------------------------------ commands

  openRegistration(accountName: Uint8Array, password: string, token: Uint8Array = new Uint8Array(0)): number {
    this.checkOpen(accountName, password);
    if (token.length > REGISTRATION_TOKEN_MAX) throw new LocalProtocolError("a registration token is at most 1024 bytes");
    const session = new ClientSession("registration", accountName);
    const start = this.opaque.registrationStart(password);
    secrets(session).password = password;
    secrets(session).opaqueState = start.state;
    const id = this.allocate(session);
    session.state = State.AWAIT_REG_RESPONSE;
    this.send(FrameType.REG_START, id, encodeRegStart({ accountName, registrationRequest: start.request, token }));
    return id;
  }

  openRequestSession(accountName: Uint8Array, password: string): number {
    this.checkOpen(accountName, password);
    const session = new ClientSession("request", accountName);
    const id = this.allocate(session);
    this.startLogin(session, id, password);
    return id;
  }

  /** Run the OPAQUE finish step the core asked for (``opaque_step``). */
  completeOpaqueStep(sessionId: number): void {
    const session = this.live.get(sessionId);
    if (session === undefined || (session.state !== State.AWAIT_REG_STEP && session.state !== State.AWAIT_LOGIN_STEP)) {
      return; // ended meanwhile (aborted, connection failed): nothing to do
    }
    const password = secrets(session).password!;
    const response = secrets(session).serverMessage!;
    secrets(session).serverMessage = null;
    if (session.state === State.AWAIT_REG_STEP) {
      let finish;
      try {
        finish = this.opaque.registrationFinish(password, secrets(session).opaqueState, response);
      } catch {
        this.sessionError(session, sessionId, ErrorCode.MALFORMED, "the server's registration response is not valid");
        return;
      }
      secrets(session).registrationExportKey = finish.exportKey;
      this.send(FrameType.REG_UPLOAD, sessionId, RegUploadCodec.encode(finish.upload));
      this.startLogin(session, sessionId, password);
      return;
    }
    let login;
    try {
      login = this.opaque.loginFinish(password, secrets(session).opaqueState, response);
    } catch {
      login = null;
    }
    secrets(session).opaqueState = null;
    secrets(session).password = null;
    if (login === null || login.sessionKey.length !== OPAQUE_KEY_SIZE || login.exportKey.length !== OPAQUE_KEY_SIZE) {
      this.sessionError(session, sessionId, ErrorCode.AUTHENTICATION_FAILED, "login failed");
      return;
    }
    if (session.kind === "registration") {
      const registered = secrets(session).registrationExportKey;
      const same = registered !== null && ctEqual(registered, login.exportKey);
      if (!same) {
        this.sessionError(session, sessionId, ErrorCode.AUTHENTICATION_FAILED, "export keys of registration and login differ");
        return;
      }
    } else {
      secrets(session).registrationExportKey = login.exportKey; // handed over at WELCOME
      secrets(session).passwordCheck = PasswordCheck.fromLogin(response);
    }
    session.channel = new Channel(login.sessionKey, "client");
    login.sessionKey.fill(0);
    session.state = State.AWAIT_WELCOME;
    this.send(FrameType.LOGIN_FINISH, sessionId, LoginFinishCodec.encode(login.finalization));
  }

  /** Send a request on an established session (held while it waits for RESUMED); its id. */
  sendRequest(sessionId: number, body: Uint8Array): number {
    const session = this.requireLive(sessionId);
    if (session.kind !== "request" || (session.state !== State.ESTABLISHED && session.state !== State.AWAIT_RESUMED)) {
      throw new LocalProtocolError(`cannot send a request in state ${session.state}`);
    }
    if (body.length > this.maxPayload - 28) throw new LocalProtocolError("request body larger than a frame can carry");
    if (session.inFlight.size >= this.maxInFlight) throw new LocalProtocolError("too many requests in flight on this session");
    if (session.nextRequestId > MAX_REQUEST_ID) throw new LocalProtocolError("request ids used up; open a new session");
    const channel = session.channel!;
    if (!channel.canSendNonClose) throw new LocalProtocolError("the session's sequence numbers are used up; open a new session");
    const requestId = session.nextRequestId++;
    session.inFlight.set(requestId, body);
    if (session.state === State.ESTABLISHED) this.sendRequestFrame(session, sessionId, requestId, body);
    return requestId;
  }

  /** Log out (CLOSE CLIENT_CLOSED); while waiting for RESUMED the CLOSE goes out after it. */
  closeSession(sessionId: number): void {
    const session = this.requireLive(sessionId);
    if (session.state === State.ESTABLISHED) {
      this.sendSealed(session, sessionId, FrameType.CLOSE, encodeClose(ErrorCode.CLIENT_CLOSED));
      this.end(session, sessionId);
      session.inFlight.clear();
    } else if (session.state === State.AWAIT_RESUMED) {
      session.state = State.CLOSE_AFTER_RESUMED;
    } else if (session.state !== State.CLOSE_AFTER_RESUMED) {
      throw new LocalProtocolError(`cannot log out in state ${session.state}`);
    }
  }

  /** Abandon a live session in any state: ABORT(CLIENT_CLOSED). */
  abortSession(sessionId: number, reason = "cancelled"): void {
    const session = this.requireLive(sessionId);
    this.send(FrameType.ABORT, sessionId, encodeAbort({ code: ErrorCode.CLIENT_CLOSED, reason: cleanReason(reason) }));
    this.end(session, sessionId);
  }

  /** Resume a session detached from an earlier connection (or deferred on this one) on a new id. */
  resumeSession(session: ClientSession): number {
    if (session.state !== State.DETACHED || session.channel === null) throw new LocalProtocolError("only a detached request session can be resumed");
    if (this.failed !== null) throw new LocalProtocolError("the connection has ended");
    const channel = session.channel;
    const clientNonce = this.random(RESUME_NONCE_SIZE);
    const record = channel.sealResume(encodeResume({ clientNonce, receivedTotal: channel.openedTotal }));
    secrets(session).resumeNonce = clientNonce;
    this.detached = this.detached.filter((s) => s !== session);
    const id = this.allocate(session);
    session.state = State.AWAIT_RESUMED;
    this.send(FrameType.RESUME, id, concat(channel.sessionHandle, record));
    return id;
  }

  // ------------------------------------------------------------ internals

  private checkOpen(accountName: Uint8Array, password: string): void {
    if (this.failed !== null) throw new LocalProtocolError("the connection has ended");
    if (accountName.length < 1 || accountName.length > ACCOUNT_NAME_MAX) throw new LocalProtocolError("an account name is 1..255 bytes");
    if (utf8(password).length > MAX_PASSWORD_SIZE) throw new LocalProtocolError(`a password is at most ${MAX_PASSWORD_SIZE} bytes`);
  }

  private allocate(session: ClientSession): number {
    if (this.highestId >= MAX_SESSION_ID) throw new LocalProtocolError("session ids used up on this connection; open a new one");
    const id = ++this.highestId;
    this.live.set(id, session);
    this.ids.set(session, id);
    return id;
  }

  private startLogin(session: ClientSession, id: number, password: string): void {
    const start = this.opaque.loginStart(password);
    secrets(session).password = password;
    secrets(session).opaqueState = start.state;
    session.state = State.AWAIT_LOGIN_RESPONSE;
    this.send(FrameType.LOGIN_START, id, encodeLoginStart({ accountName: session.accountName, credentialRequest: start.request }));
  }

  private requireLive(sessionId: number): ClientSession {
    if (this.failed !== null) throw new LocalProtocolError("the connection has ended");
    const session = this.live.get(sessionId);
    if (session === undefined) throw new LocalProtocolError("no such live session");
    return session;
  }

  private send(type: FrameType, sessionId: number, payload: Uint8Array): void {
    this.outbox.push(encodeFrame(type, sessionId, payload));
  }

  private sendSealed(session: ClientSession, sessionId: number, type: FrameType, plaintext: Uint8Array): void {
    this.send(type, sessionId, session.channel!.seal(type, plaintext));
  }

  private sendRequestFrame(session: ClientSession, sessionId: number, requestId: number, body: Uint8Array): void {
    this.sendSealed(session, sessionId, FrameType.REQUEST, encodeRequestMessage({ requestId, body }));
  }

  /** Forget a session on this connection and wipe what it no longer needs. */
  private end(session: ClientSession, sessionId: number): void {
    secrets(session).registrationExportKey?.fill(0);
    secretsOf.delete(session);
    session.state = State.CLOSED;
    session.channel = null;
    this.live.delete(sessionId);
    this.ids.delete(session);
  }

  /** A session error: ABORT(code) in clear, forget the session, report it. */
  private sessionError(session: ClientSession, sessionId: number, code: ErrorCode, reason: string): void {
    this.send(FrameType.ABORT, sessionId, encodeAbort({ code, reason: cleanReason(reason) }));
    this.end(session, sessionId);
    this.events.push({ type: "failed", session, sessionId, code, reason, remote: false });
  }

  private failConnection(code: ErrorCode, reason: string, remote: boolean, sendGoAway: boolean): void {
    if (sendGoAway) this.send(FrameType.GOAWAY, 0, encodeAbort({ code, reason: cleanReason(reason) }));
    this.failed = { code, reason };
    for (const [sessionId, session] of [...this.live]) {
      this.live.delete(sessionId);
      this.ids.delete(session);
      if (session.state === State.ESTABLISHED || session.state === State.AWAIT_RESUMED) {
        session.state = State.DETACHED;
        this.detached.push(session);
      } else if (session.state === State.CLOSE_AFTER_RESUMED) {
        this.end(session, sessionId);
        this.events.push({ type: "closed", session, sessionId, code: ErrorCode.CLIENT_CLOSED });
      } else {
        this.end(session, sessionId);
        this.events.push({ type: "failed", session, sessionId, code: ErrorCode.CONNECTION_LOST, reason, remote: false });
      }
    }
    this.events.push({ type: "connection_failed", code, reason, remote });
  }

  private dispatch(frame: Frame): void {
    if (frame.type === FrameType.GOAWAY) {
      if (frame.sessionId !== 0) {
        this.failConnection(ErrorCode.MALFORMED, "GOAWAY on a session id", true, true);
        return;
      }
      let goaway;
      try {
        goaway = decodeAbort(frame.payload);
      } catch (error) {
        this.failConnection(ErrorCode.MALFORMED, (error as Error).message, true, true);
        return;
      }
      this.failConnection(goaway.code, `peer sent GOAWAY: ${goaway.reason}`, true, false);
      return;
    }
    if (frame.sessionId === 0) {
      this.failConnection(ErrorCode.BAD_SESSION_ID, `${FrameType[frame.type]} on session id 0`, true, true);
      return;
    }
    if (frame.sessionId > this.highestId) {
      this.failConnection(ErrorCode.BAD_SESSION_ID, "frame for a session id never opened", true, true);
      return;
    }
    const session = this.live.get(frame.sessionId);
    if (session === undefined) return; // a late frame for a session that ended
    try {
      this.handle(session, frame.sessionId, frame);
    } catch (error) {
      if (error instanceof ProtocolError) {
        if (this.live.get(frame.sessionId) === session) this.sessionError(session, frame.sessionId, error.code, error.message);
        return;
      }
      throw error;
    }
  }

  private unexpected(frame: Frame, session: ClientSession): never {
    throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, `${FrameType[frame.type]} not expected in ${session.state}`);
  }

  private handle(session: ClientSession, sessionId: number, frame: Frame): void {
    const state = session.state;
    switch (frame.type) {
      case FrameType.ABORT: {
        let code: ErrorCode = ErrorCode.MALFORMED;
        let reason = "malformed ABORT";
        try {
          ({ code, reason } = decodeAbort(frame.payload));
        } catch {
          // a malformed ABORT still ends the session, without a reply
        }
        if (code === ErrorCode.RATE_LIMITED && state === State.AWAIT_RESUMED) {
          this.live.delete(sessionId);
          this.ids.delete(session);
          session.state = State.DETACHED;
          this.detached.push(session);
          this.events.push({ type: "resume_deferred", session, sessionId });
          return;
        }
        this.end(session, sessionId);
        this.events.push({ type: "failed", session, sessionId, code, reason, remote: true });
        return;
      }
      case FrameType.REG_RESPONSE:
        if (state !== State.AWAIT_REG_RESPONSE) this.unexpected(frame, session);
        secrets(session).serverMessage = RegResponseCodec.decode(frame.payload);
        session.state = State.AWAIT_REG_STEP;
        this.events.push({ type: "opaque_step", session, sessionId });
        return;
      case FrameType.LOGIN_RESPONSE:
        if (state !== State.AWAIT_LOGIN_RESPONSE) this.unexpected(frame, session);
        secrets(session).serverMessage = LoginResponseCodec.decode(frame.payload);
        session.state = State.AWAIT_LOGIN_STEP;
        this.events.push({ type: "opaque_step", session, sessionId });
        return;
      case FrameType.WELCOME: {
        if (state !== State.AWAIT_WELCOME) this.unexpected(frame, session);
        const userId = WelcomeCodec.decode(session.channel!.open(FrameType.WELCOME, frame.payload));
        session.userId = userId;
        if (session.kind === "registration") {
          const master = masterKey(secrets(session).registrationExportKey!);
          const storageKey = this.random(KEY_SIZE);
          const encryptedStorageKey = wrapStorageKey(master, userId, storageKey, this.random(NONCE_SIZE));
          master.fill(0);
          storageKey.fill(0);
          secrets(session).registrationExportKey = null;
          this.sendSealed(session, sessionId, FrameType.COMPLETE_REGISTRATION, encodeCompleteRegistration({ userId, encryptedStorageKey }));
          session.state = State.AWAIT_REG_CLOSE;
        } else {
          const exportKey = secrets(session).registrationExportKey!;
          const passwordCheck = secrets(session).passwordCheck;
          secrets(session).registrationExportKey = null;
          secrets(session).passwordCheck = null;
          session.state = State.ESTABLISHED;
          this.events.push({ type: "established", session, sessionId, userId, exportKey, passwordCheck });
        }
        return;
      }
      case FrameType.RESPONSE: {
        if (state !== State.ESTABLISHED) this.unexpected(frame, session);
        const { requestId, body } = decodeRequestMessage(session.channel!.open(FrameType.RESPONSE, frame.payload));
        if (!session.inFlight.has(requestId)) throw new ProtocolError(ErrorCode.INVALID_REQUEST, "response to a request not in flight");
        session.inFlight.delete(requestId);
        this.events.push({ type: "response", session, sessionId, requestId, body });
        return;
      }
      case FrameType.CLOSE: {
        if (state !== State.AWAIT_REG_CLOSE && state !== State.ESTABLISHED && state !== State.AWAIT_RESUMED && state !== State.CLOSE_AFTER_RESUMED) {
          this.unexpected(frame, session);
        }
        const code = decodeClose(session.channel!.open(FrameType.CLOSE, frame.payload));
        this.end(session, sessionId);
        session.inFlight.clear();
        if (state === State.AWAIT_REG_CLOSE && code === ErrorCode.OK) {
          this.events.push({ type: "registered", session, sessionId, userId: session.userId! });
        } else if (state === State.AWAIT_REG_CLOSE) {
          this.events.push({ type: "failed", session, sessionId, code, reason: "registration not stored", remote: true });
        } else {
          this.events.push({ type: "closed", session, sessionId, code });
        }
        return;
      }
      case FrameType.RESUMED: {
        if (state !== State.AWAIT_RESUMED && state !== State.CLOSE_AFTER_RESUMED) this.unexpected(frame, session);
        const envelope = decodeResumedEnvelope(frame.payload);
        const channel = session.channel!;
        channel.startEpoch(secrets(session).resumeNonce!, envelope.serverNonce);
        secrets(session).resumeNonce = null;
        decodeResumed(channel.open(FrameType.RESUMED, frame.payload.subarray(32)));
        if (state === State.CLOSE_AFTER_RESUMED) {
          this.sendSealed(session, sessionId, FrameType.CLOSE, encodeClose(ErrorCode.CLIENT_CLOSED));
          this.end(session, sessionId);
          session.inFlight.clear();
          this.events.push({ type: "closed", session, sessionId, code: ErrorCode.CLIENT_CLOSED });
          return;
        }
        session.state = State.ESTABLISHED;
        for (const [requestId, body] of [...session.inFlight].sort((a, b) => a[0] - b[0])) {
          this.sendRequestFrame(session, sessionId, requestId, body);
        }
        this.events.push({ type: "resumed", session, sessionId });
        return;
      }
      default:
        this.unexpected(frame, session);
    }
  }
}
