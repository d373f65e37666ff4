/** A small in-memory key server for the client's tests: real OPAQUE (the server side of
 * @serenity-kit/opaque), the channel, resumption and the operations, written from
 * docs/protocol.md with the core's codecs. Not the key server: only what the tests need,
 * plus hooks to drop connections and to tamper with answers. Section 12.13 as the key server
 * does it: a password change or deletion needs a login younger than ``reauthWindowUs``
 * (else INVALID); after a change every other session of the account gets CLOSE(NOT_AUTHORIZED),
 * and a session whose account's credentials version moved on (a change made on another
 * instance: ``changedElsewhere``) or whose account is gone is ended at its next request, with
 * no answer; ``releaseBefore`` answers such a request as the release before did (NOT_FOUND). */

import * as opaque from "@serenity-kit/opaque";
import { concat, ctEqual, toHex, u8, utf8 } from "../src/core/bytes.js";
import { Action, AuditType, Context, ErrorCode, FrameType, KEY_ACTIONS, MAX_AUDIT_SCAN, Op, Outcome, SecretKind, Status } from "../src/core/constants.js";
import { Channel } from "../src/core/crypto.js";
import { FrameBuffer, encodeFrame, type Frame } from "../src/core/framing.js";
import * as M from "../src/core/messages.js";
import {
  AUDIT_GENESIS_HASH,
  auditChainHash,
  decodeRequest,
  encodeAuditEntry,
  encodeResponse,
  jointKeyId,
  secretAd,
  type ChainedAuditEntry,
  type OpRequest,
  type OpResponse,
} from "../src/core/ops.js";
import { fromBase64Url, toBase64Url } from "../src/opaque.js";
import type { Transport } from "../src/transport.js";

const random = (n: number) => globalThis.crypto.getRandomValues(new Uint8Array(n));

interface Account {
  name: string;
  userId: Uint8Array;
  record: string;
  encryptedStorageKey: Uint8Array;
  /** Moves on with every password change (section 12.13). */
  credentialsVersion: number;
}

interface StoredSecret {
  kind: SecretKind;
  sealed: Uint8Array;
  ad: Uint8Array;
  created: bigint;
  sealedLabel: Uint8Array;
}

interface ServerSession {
  kind: "registration" | "request";
  state: string;
  name: string;
  userId: Uint8Array | null;
  channel: Channel | null;
  loginState: string | null;
  upload: string | null;
  handle: string | null;
  conn: FakeConnection | null;
  reservations: Map<string, SecretKind>;
  highestRequest: number;
  answers: ReplyCache;
  /** The account's credentials version the login read, and when the login started (µs). */
  credentialsVersion: number;
  loginAt: bigint;
}

/** docs/protocol.md section 9: the ops that change nothing but the audit log. */
export const READ_OPS: ReadonlySet<number> = new Set([Op.RETRIEVE_STORAGE_KEY, Op.RETRIEVE, Op.AUDIT, Op.LIST_KEYS, Op.CHANGE_PASSWORD_START]);

/** A session's reply cache as the key server keeps it (docs/protocol.md section 9): the last
 * ``window`` answered requests, oldest first, each with its answer, or null for a read whose
 * answer would have passed ``budget`` bytes beside the answers kept (run again if re-sent). */
export class ReplyCache {
  readonly entries = new Map<number, Uint8Array | null>();
  keptBytes = 0;

  constructor(
    readonly budget = 4096,
    readonly window = 16,
  ) {}

  remember(requestId: number, answer: Uint8Array, read: boolean): void {
    for (const [oldest, old] of this.entries) {
      if (this.entries.size < this.window) break;
      this.entries.delete(oldest);
      if (old !== null) this.keptBytes -= old.length;
    }
    if (read && this.keptBytes + answer.length > this.budget) {
      this.entries.set(requestId, null);
    } else {
      this.entries.set(requestId, answer);
      this.keptBytes += answer.length;
    }
  }
}

export class FakeKeyServer {
  readonly setup = opaque.server.createSetup();
  readonly accounts = new Map<string, Account>();
  readonly secrets = new Map<string, Map<string, StoredSecret>>();
  readonly audit = new Map<string, ChainedAuditEntry[]>();
  readonly registry = new Map<string, ServerSession>();
  readonly connections = new Set<FakeConnection>();
  /** Requests received, in order (op numbers), for the tests' checks. */
  readonly requests: Op[] = [];
  /** Called with each OK answer before it is sent; may return other bytes. */
  tamper: ((request: OpRequest, body: Uint8Array) => Uint8Array) | null = null;
  /** When it returns true for a request, the server answers RATE_LIMITED and does nothing (its per-user rate). */
  rateLimited: ((request: OpRequest) => boolean) | null = null;
  /** When it returns true for a request, the server answers it (cached) but the connection drops first. */
  dropBeforeAnswer: ((request: OpRequest) => boolean) | null = null;
  /** Most entries one AUDIT reads (MAX_AUDIT_SCAN; a test may make it small). */
  auditScan = MAX_AUDIT_SCAN;
  /** Each AUDIT page answered: its cursor, how many entries, its next_cursor. */
  readonly auditPages: { cursor: bigint; count: number; nextCursor: bigint }[] = [];
  /** ABORT(RATE_LIMITED) this many RESUMEs before accepting them. */
  refuseResumes = 0;
  clock = 1_700_000_000_000_000n;
  /** sessions.reauth_window: how old (µs of ``clock``) a login may be to change the password or delete the account. */
  reauthWindowUs = 300_000_000n;
  /** Behave as the key server of the release before: no credentials check, so a session of a
   * deleted account gets NOT_FOUND to its requests. */
  releaseBefore = false;

  /** A Connector's transport: the client's end of a new in-memory connection. */
  connect = async (): Promise<Transport> => {
    const conn = new FakeConnection(this);
    this.connections.add(conn);
    return conn.clientEnd;
  };

  /** A password change made on another instance sharing the database: the account's
   * credentials version moves on, and nothing here is told. */
  changedElsewhere(name: string): void {
    this.accounts.get(toHex(utf8(name)))!.credentialsVersion += 1;
  }

  /** After a password change: every other session of the account ends (CLOSE(NOT_AUTHORIZED)
   * to the attached ones, the detached ones forgotten). */
  endOtherSessions(userId: Uint8Array, keep: ServerSession): void {
    for (const [handle, session] of [...this.registry]) {
      if (session === keep || session.userId === null || !ctEqual(session.userId, userId)) continue;
      this.registry.delete(handle);
      session.conn?.closeSession(session, ErrorCode.NOT_AUTHORIZED);
    }
  }

  /** Drop every connection (as a network failure would): sessions stay for resumption. */
  dropAll(): void {
    for (const conn of [...this.connections]) conn.drop("dropped by the test");
  }

  writeAudit(userId: Uint8Array, action: Action, outcome: Outcome, keyId: Uint8Array | null = null, context: Context | null = null): void {
    const log = this.audit.get(toHex(userId)) ?? [];
    this.audit.set(toHex(userId), log);
    const entry = { entryId: BigInt(log.length + 1), action, timestamp: this.clock++, outcome, count: 1, keyId, context };
    const previous = log.length === 0 ? AUDIT_GENESIS_HASH : log[log.length - 1]!.chainHash;
    log.push({ ...entry, chainHash: auditChainHash(userId, previous, encodeAuditEntry(entry)) });
  }

  handleOp(session: ServerSession, request: OpRequest): OpResponse {
    const userId = session.userId!;
    const user = toHex(userId);
    const ok = (fields: object) => ({ status: Status.OK, fields }) as OpResponse;
    const refuse = (status: Status) => ({ status }) as OpResponse;
    if (!ctEqual(request.userId, userId)) return refuse(Status.WRONG_USER);
    const secrets = this.secrets.get(user) ?? new Map<string, StoredSecret>();
    this.secrets.set(user, secrets);
    const account = [...this.accounts.values()].find((a) => ctEqual(a.userId, userId));
    if (this.releaseBefore && !account) return refuse(Status.NOT_FOUND);
    const recent = this.clock - session.loginAt <= this.reauthWindowUs;
    switch (request.op) {
      case Op.RETRIEVE_STORAGE_KEY:
        return account ? ok({ encryptedStorageKey: account.encryptedStorageKey }) : refuse(Status.NOT_FOUND);
      case Op.CREATE_KEY_ID: {
        const serverNonce = random(32);
        const keyId = jointKeyId(userId, request.clientNonce, serverNonce);
        session.reservations.set(toHex(keyId), request.kind);
        return ok({ keyId, serverNonce });
      }
      case Op.STORE_SECRET: {
        const key = toHex(request.keyId);
        if (session.reservations.get(key) !== request.kind || secrets.has(key)) return refuse(Status.INVALID);
        session.reservations.delete(key);
        secrets.set(key, { kind: request.kind, sealed: request.sealed, ad: secretAd(userId, request.keyId, request.kind), created: this.clock++, sealedLabel: new Uint8Array(0) });
        let next = null;
        if (request.next !== null) {
          const serverNonce = random(32);
          const keyId = jointKeyId(userId, request.next.clientNonce, serverNonce);
          session.reservations.set(toHex(keyId), request.next.kind);
          next = { keyId, serverNonce };
        }
        return ok({ next });
      }
      case Op.RETRIEVE: {
        const stored = secrets.get(toHex(request.keyId));
        return stored ? ok({ kind: stored.kind, sealed: stored.sealed, associatedData: stored.ad }) : refuse(Status.NOT_FOUND);
      }
      case Op.AUDIT: {
        // Section 12.9: read at most auditScan entries after the cursor; a short or empty
        // page goes on from the last entry read, 0 when those reach the log's end.
        const after = (this.audit.get(user) ?? []).filter((e) => e.entryId > request.cursor);
        const read = after.slice(0, this.auditScan);
        const all = read.filter((e) => {
          if (request.auditType === AuditType.SYSTEM_ONLY && KEY_ACTIONS.has(e.action)) return false;
          if (request.auditType === AuditType.KEY_ONLY && !KEY_ACTIONS.has(e.action)) return false;
          if (request.keyIds.length > 0 && (e.keyId === null || !request.keyIds.some((k) => ctEqual(k, e.keyId!)))) return false;
          if (request.after !== null && e.timestamp < request.after) return false;
          if (request.before !== null && e.timestamp >= request.before) return false;
          return true;
        });
        const entries = all.slice(0, request.limit);
        let nextCursor = 0n;
        if (all.length > request.limit) nextCursor = entries[entries.length - 1]!.entryId;
        else if (after.length > read.length) nextCursor = read[read.length - 1]!.entryId;
        this.auditPages.push({ cursor: request.cursor, count: entries.length, nextCursor });
        return ok({ entries, nextCursor });
      }
      case Op.LIST_KEYS: {
        const all = [...secrets.entries()].sort((a, b) => Number(a[1].created - b[1].created));
        const page = all.slice(request.cursor, request.cursor + request.limit);
        const nextCursor = request.cursor + request.limit < all.length ? request.cursor + request.limit : 0;
        return ok({ keys: page.map(([k, s]) => ({ keyId: fromHex(k), kind: s.kind, created: s.created, sealedLabel: s.sealedLabel })), nextCursor });
      }
      case Op.DELETE_KEY:
        return secrets.delete(toHex(request.keyId)) ? ok({}) : refuse(Status.NOT_FOUND);
      case Op.RENAME_KEY: {
        const stored = secrets.get(toHex(request.keyId));
        if (!stored) return refuse(Status.NOT_FOUND);
        stored.sealedLabel = request.sealedLabel;
        return ok({});
      }
      case Op.CHANGE_PASSWORD_START: {
        if (!account) return refuse(Status.NOT_FOUND);
        if (!recent) return refuse(Status.INVALID);
        const { registrationResponse } = opaque.server.createRegistrationResponse({ serverSetup: this.setup, userIdentifier: account.name, registrationRequest: toBase64Url(request.registrationRequest) });
        return ok({ registrationResponse: fromBase64Url(registrationResponse) });
      }
      case Op.CHANGE_PASSWORD_FINISH:
        if (!account) return refuse(Status.NOT_FOUND);
        if (!recent) return refuse(Status.INVALID);
        account.record = toBase64Url(request.registrationUpload);
        account.encryptedStorageKey = request.encryptedStorageKey;
        account.credentialsVersion += 1;
        session.credentialsVersion = account.credentialsVersion;
        this.endOtherSessions(userId, session);
        return ok({});
      case Op.DELETE_ACCOUNT:
        if (!account) return refuse(Status.NOT_FOUND);
        if (!recent) return refuse(Status.INVALID);
        this.accounts.delete(account.name);
        this.secrets.delete(user);
        this.audit.delete(user);
        this.endOtherSessions(userId, session);
        return ok({});
    }
  }
}

function fromHex(hex: string): Uint8Array {
  return Uint8Array.from(hex.match(/../g)!.map((b) => parseInt(b, 16)));
}

const OP_ACTIONS: Partial<Record<Op, Action>> = {
  [Op.RETRIEVE_STORAGE_KEY]: Action.RETRIEVE_STORAGE_KEY,
  [Op.CREATE_KEY_ID]: Action.CREATE_KEY_ID,
  [Op.RETRIEVE]: Action.RETRIEVE,
  [Op.AUDIT]: Action.AUDIT,
  [Op.LIST_KEYS]: Action.LIST_KEYS,
  [Op.DELETE_KEY]: Action.DELETE_KEY,
  [Op.RENAME_KEY]: Action.RENAME_KEY,
  [Op.CHANGE_PASSWORD_FINISH]: Action.CHANGE_PASSWORD,
};

export class FakeConnection {
  readonly clientEnd: Transport;
  private readonly frames = new FrameBuffer(66560);
  private readonly sessions = new Map<number, ServerSession>();
  private highest = 0;
  private dead = false;

  constructor(private readonly server: FakeKeyServer) {
    const self = this;
    this.clientEnd = {
      onData: null,
      onClose: null,
      send(frame) {
        const copy = frame.slice();
        setImmediate(() => self.receive(copy));
      },
      close() {
        self.drop("closed by the client");
      },
    };
  }

  drop(reason: string): void {
    if (this.dead) return;
    this.dead = true;
    this.server.connections.delete(this);
    for (const session of this.sessions.values()) if (session.conn === this) session.conn = null;
    this.sessions.clear();
    const onClose = this.clientEnd.onClose;
    setImmediate(() => onClose?.(reason));
  }

  private send(type: FrameType, sessionId: number, payload: Uint8Array): void {
    if (this.dead) return;
    const frame = encodeFrame(type, sessionId, payload);
    setImmediate(() => {
      if (!this.dead) this.clientEnd.onData?.(frame);
    });
  }

  private abort(sessionId: number, code: ErrorCode, reason = ""): void {
    this.send(FrameType.ABORT, sessionId, M.encodeAbort({ code, reason }));
    const session = this.sessions.get(sessionId);
    if (session) this.forget(sessionId, session);
  }

  /** End a session attached here with a sealed CLOSE(``code``). */
  closeSession(session: ServerSession, code: ErrorCode): void {
    for (const [sid, s] of this.sessions) {
      if (s !== session) continue;
      this.sealed(session, sid, FrameType.CLOSE, M.encodeClose(code));
      this.forget(sid, session);
    }
  }

  private forget(sessionId: number, session: ServerSession): void {
    this.sessions.delete(sessionId);
    if (session.handle) this.server.registry.delete(session.handle);
  }

  private sealed(session: ServerSession, sessionId: number, type: FrameType, plaintext: Uint8Array): void {
    this.send(type, sessionId, session.channel!.seal(type, plaintext));
  }

  receive(data: Uint8Array): void {
    if (this.dead) return;
    for (const frame of this.frames.feed(data)) {
      if (this.dead) return;
      this.handle(frame);
    }
  }

  private handle(frame: Frame): void {
    const server = this.server;
    if (frame.type === FrameType.GOAWAY) {
      this.drop("client sent GOAWAY");
      return;
    }
    let session = this.sessions.get(frame.sessionId);
    if (session === undefined) {
      if (frame.sessionId <= this.highest) return;
      this.highest = frame.sessionId;
      if (frame.type === FrameType.REG_START) {
        const m = M.decodeRegStart(frame.payload);
        const name = toHex(m.accountName);
        if (server.accounts.has(name)) return this.abort(frame.sessionId, ErrorCode.ACCOUNT_EXISTS, "account exists");
        session = this.newSession("registration", name);
        this.sessions.set(frame.sessionId, session);
        const { registrationResponse } = opaque.server.createRegistrationResponse({ serverSetup: server.setup, userIdentifier: name, registrationRequest: toBase64Url(m.registrationRequest) });
        session.state = "AWAIT_REG_UPLOAD";
        this.send(FrameType.REG_RESPONSE, frame.sessionId, fromBase64Url(registrationResponse));
        return;
      }
      if (frame.type === FrameType.LOGIN_START) {
        const m = M.decodeLoginStart(frame.payload);
        session = this.newSession("request", toHex(m.accountName));
        this.sessions.set(frame.sessionId, session);
        this.startLogin(session, frame.sessionId, m.credentialRequest, server.accounts.get(session.name)?.record ?? null);
        return;
      }
      if (frame.type === FrameType.RESUME) {
        if (server.refuseResumes > 0) {
          server.refuseResumes -= 1;
          return this.abort(frame.sessionId, ErrorCode.RATE_LIMITED, "slow down");
        }
        const envelope = M.decodeResumeEnvelope(frame.payload);
        const found = server.registry.get(toHex(envelope.sessionHandle));
        if (!found || found.conn === this) return this.abort(frame.sessionId, ErrorCode.UNKNOWN_SESSION);
        let resume;
        try {
          resume = M.decodeResume(found.channel!.openResume(M.encodeRecord(envelope.record)));
        } catch {
          return this.abort(frame.sessionId, ErrorCode.UNKNOWN_SESSION);
        }
        if (resume.receivedTotal > found.channel!.sealedTotal) return this.abort(frame.sessionId, ErrorCode.UNKNOWN_SESSION);
        if (found.conn) found.conn.sessions.forEach((s, id, map) => s === found && map.delete(id));
        found.conn = this;
        this.sessions.set(frame.sessionId, found);
        const serverNonce = random(32);
        found.channel!.startEpoch(resume.clientNonce, serverNonce);
        this.send(FrameType.RESUMED, frame.sessionId, concat(serverNonce, found.channel!.seal(FrameType.RESUMED, new Uint8Array(0))));
        return;
      }
      return this.abort(frame.sessionId, ErrorCode.UNEXPECTED_FRAME);
    }
    const sid = frame.sessionId;
    try {
      switch (frame.type) {
        case FrameType.ABORT:
          this.forget(sid, session);
          return;
        case FrameType.REG_UPLOAD:
          session.upload = toBase64Url(M.RegUploadCodec.decode(frame.payload));
          session.state = "AWAIT_LOGIN_START";
          return;
        case FrameType.LOGIN_START: {
          const m = M.decodeLoginStart(frame.payload);
          if (toHex(m.accountName) !== session.name) return this.abort(sid, ErrorCode.INVALID_REQUEST);
          this.startLogin(session, sid, m.credentialRequest, session.upload);
          return;
        }
        case FrameType.LOGIN_FINISH: {
          let sessionKey: string;
          try {
            ({ sessionKey } = opaque.server.finishLogin({ serverLoginState: session.loginState!, finishLoginRequest: toBase64Url(M.LoginFinishCodec.decode(frame.payload)) }));
          } catch {
            return this.abort(sid, ErrorCode.AUTHENTICATION_FAILED);
          }
          const account = server.accounts.get(session.name);
          if (session.kind === "request" && !account) return this.abort(sid, ErrorCode.AUTHENTICATION_FAILED);
          session.channel = new Channel(fromBase64Url(sessionKey), "server");
          session.userId = session.kind === "registration" ? random(16) : account!.userId;
          if (session.kind === "request") {
            session.credentialsVersion = account!.credentialsVersion;
            session.handle = toHex(session.channel.sessionHandle);
            server.registry.set(session.handle, session);
            server.writeAudit(session.userId, Action.LOGIN, Outcome.SUCCESS);
          }
          session.state = "ESTABLISHED";
          this.sealed(session, sid, FrameType.WELCOME, session.userId);
          return;
        }
        case FrameType.COMPLETE_REGISTRATION: {
          const m = M.decodeCompleteRegistration(session.channel!.open(FrameType.COMPLETE_REGISTRATION, frame.payload));
          if (!ctEqual(m.userId, session.userId!)) return this.abort(sid, ErrorCode.INVALID_REQUEST);
          server.accounts.set(session.name, { name: session.name, userId: m.userId, record: session.upload!, encryptedStorageKey: m.encryptedStorageKey, credentialsVersion: 0 });
          server.writeAudit(m.userId, Action.REGISTER, Outcome.SUCCESS);
          this.sealed(session, sid, FrameType.CLOSE, M.encodeClose(ErrorCode.OK));
          this.forget(sid, session);
          return;
        }
        case FrameType.CLOSE:
          session.channel!.open(FrameType.CLOSE, frame.payload);
          server.writeAudit(session.userId!, Action.LOGOUT, Outcome.SUCCESS);
          this.forget(sid, session);
          return;
        case FrameType.REQUEST: {
          const { requestId, body } = M.decodeRequestMessage(session.channel!.open(FrameType.REQUEST, frame.payload));
          const read = body.length > 0 && READ_OPS.has(body[0]!);
          if (session.answers.entries.has(requestId)) {
            const cached = session.answers.entries.get(requestId)!;
            if (cached !== null) {
              this.sealed(session, sid, FrameType.RESPONSE, M.encodeRequestMessage({ requestId, body: cached }));
              return;
            }
            // a read whose answer was not kept runs again; nothing else may come on its id
            if (!read) return this.abort(sid, ErrorCode.INVALID_REQUEST);
            session.answers.entries.delete(requestId);
          } else {
            if (requestId <= session.highestRequest) return this.abort(sid, ErrorCode.INVALID_REQUEST);
            session.highestRequest = requestId;
          }
          const account = server.accounts.get(session.name);
          if (!server.releaseBefore && account?.credentialsVersion !== session.credentialsVersion) {
            // the password changed after this login, or the account is gone: no answer, CLOSE
            this.closeSession(session, ErrorCode.NOT_AUTHORIZED);
            return;
          }
          let answer: Uint8Array;
          let request: OpRequest | null = null;
          try {
            request = decodeRequest(body);
          } catch {
            answer = u8(Status.INVALID);
          }
          if (request !== null && server.rateLimited?.(request)) {
            answer = u8(Status.RATE_LIMITED); // nothing done, nothing audited
            session.answers.remember(requestId, answer, read);
            request = null;
          } else if (request !== null) {
            server.requests.push(request.op);
            const response = server.handleOp(session, request);
            const action = OP_ACTIONS[request.op] ?? (request.op === Op.STORE_SECRET ? (request.kind === SecretKind.IMPORTED ? Action.IMPORT : Action.GENERATE) : null);
            if (action !== null && request.op !== Op.DELETE_ACCOUNT) {
              const keyId = "keyId" in request ? request.keyId : null;
              server.writeAudit(session.userId!, action, response.status === Status.OK ? Outcome.SUCCESS : Outcome.FAILURE, keyId, request.op === Op.RETRIEVE ? request.context : null);
            }
            answer = encodeResponse(request.op, response);
            if (response.status === Status.OK && server.tamper) answer = server.tamper(request, answer);
            session.answers.remember(requestId, answer, read);
            if (server.dropBeforeAnswer?.(request)) {
              server.dropBeforeAnswer = null;
              this.drop("dropped before the answer");
              return;
            }
          }
          this.sealed(session, sid, FrameType.RESPONSE, M.encodeRequestMessage({ requestId, body: answer! }));
          if (request?.op === Op.DELETE_ACCOUNT && answer![0] === Status.OK) {
            this.sealed(session, sid, FrameType.CLOSE, M.encodeClose(ErrorCode.NOT_AUTHORIZED));
            this.forget(sid, session);
          }
          return;
        }
        default:
          return this.abort(sid, ErrorCode.UNEXPECTED_FRAME);
      }
    } catch {
      return this.abort(sid, ErrorCode.BAD_RECORD);
    }
  }

  private newSession(kind: "registration" | "request", name: string): ServerSession {
    return { kind, state: "NEW", name, userId: null, channel: null, loginState: null, upload: null, handle: null, conn: this, reservations: new Map(), highestRequest: 0, answers: new ReplyCache(), credentialsVersion: 0, loginAt: this.server.clock };
  }

  private startLogin(session: ServerSession, sid: number, credentialRequest: Uint8Array, record: string | null): void {
    const { serverLoginState, loginResponse } = opaque.server.startLogin({
      serverSetup: this.server.setup,
      registrationRecord: record,
      startLoginRequest: toBase64Url(credentialRequest),
      userIdentifier: session.name,
    });
    session.loginState = serverLoginState;
    session.state = "AWAIT_LOGIN_FINISH";
    this.send(FrameType.LOGIN_RESPONSE, sid, fromBase64Url(loginResponse));
  }
}
