/** The client session state machine (src/core/connection.ts) frame by frame, against a
 * scripted server built from the core's own channel: every refusal the protocol asks of a
 * client, performed and checked. */

import { test } from "node:test";
import assert from "node:assert/strict";
import { concat, toHex, utf8 } from "../src/core/bytes.js";
import { ErrorCode, FrameType, HEADER_SIZE, MAX_SEQ } from "../src/core/constants.js";
import { Channel, masterKey, unwrapStorageKey } from "../src/core/crypto.js";
import { LocalProtocolError } from "../src/core/errors.js";
import { FrameBuffer, encodeFrame, type Frame } from "../src/core/framing.js";
import * as M from "../src/core/messages.js";
import { ClientConnection, State, type ClientEvent } from "../src/core/connection.js";
import { countingRandom, fakeOpaque } from "./support.js";

const SESSION_KEY = new Uint8Array(64).fill(0x5a);
const EXPORT_KEY = new Uint8Array(64).fill(0x11);
const USER_ID = new Uint8Array(16).fill(0x24);
const NAME = utf8("alice@example.org");

function sent(conn: ClientConnection): Frame[] {
  return new FrameBuffer(66560).feed(conn.dataToSend());
}

function types(events: ClientEvent[]): string[] {
  return events.map((e) => e.type);
}

/** A client with an established request session on id 1, and the server's channel for it. */
function established(opaque = fakeOpaque(SESSION_KEY, EXPORT_KEY)) {
  const conn = new ClientConnection(opaque, countingRandom());
  const sid = conn.openRequestSession(NAME, "pw");
  conn.receiveData(encodeFrame(FrameType.LOGIN_RESPONSE, sid, new Uint8Array(320)));
  conn.completeOpaqueStep(sid);
  const server = new Channel(SESSION_KEY, "server");
  conn.receiveData(encodeFrame(FrameType.WELCOME, sid, server.seal(FrameType.WELCOME, USER_ID)));
  const events = conn.takeEvents();
  assert.deepEqual(types(events), ["opaque_step", "established"]);
  const frames = sent(conn);
  assert.deepEqual(frames.map((f) => f.type), [FrameType.LOGIN_START, FrameType.LOGIN_FINISH]);
  return { conn, sid, server };
}

function respond(server: Channel, sid: number, requestId: number, body: Uint8Array): Uint8Array {
  return encodeFrame(FrameType.RESPONSE, sid, server.seal(FrameType.RESPONSE, M.encodeRequestMessage({ requestId, body })));
}

function abortOf(frame: Frame | undefined): ErrorCode {
  assert.equal(frame?.type, FrameType.ABORT);
  return M.decodeAbort(frame!.payload).code;
}

test("request session: login, pipelined requests answered in any order, logout", () => {
  const { conn, sid, server } = established();
  const a = conn.sendRequest(sid, utf8("one"));
  const b = conn.sendRequest(sid, utf8("two"));
  assert.deepEqual([a, b], [1, 2]);
  const requests = sent(conn).map((frame) => M.decodeRequestMessage(server.open(FrameType.REQUEST, frame.payload)));
  assert.deepEqual(requests.map((r) => r.requestId), [1, 2]);
  conn.receiveData(concat(respond(server, sid, 2, utf8("B")), respond(server, sid, 1, utf8("A"))));
  const events = conn.takeEvents() as Extract<ClientEvent, { type: "response" }>[];
  assert.deepEqual(events.map((e) => [e.requestId, new TextDecoder().decode(e.body)]), [[2, "B"], [1, "A"]]);
  conn.closeSession(sid);
  const [close] = sent(conn);
  assert.equal(M.decodeClose(server.open(FrameType.CLOSE, close!.payload)), ErrorCode.CLIENT_CLOSED);
  assert.equal(conn.session(sid), undefined);
  // a late frame for the ended session is ignored, not answered
  conn.receiveData(respond(server, sid, 3, utf8("late")));
  assert.deepEqual([conn.takeEvents(), conn.dataToSend().length, conn.failed], [[], 0, null]);
});

test("registration: COMPLETE_REGISTRATION carries the storage key wrapped under the export key's master key", () => {
  const conn = new ClientConnection(fakeOpaque(SESSION_KEY, EXPORT_KEY), countingRandom());
  const sid = conn.openRegistration(NAME, "pw", utf8("invite"));
  const [start] = sent(conn);
  assert.equal(start?.type, FrameType.REG_START);
  assert.deepEqual(M.decodeRegStart(start!.payload).token, utf8("invite"));
  conn.receiveData(encodeFrame(FrameType.REG_RESPONSE, sid, new Uint8Array(64)));
  conn.completeOpaqueStep(sid);
  assert.deepEqual(sent(conn).map((f) => f.type), [FrameType.REG_UPLOAD, FrameType.LOGIN_START], "sent together");
  conn.receiveData(encodeFrame(FrameType.LOGIN_RESPONSE, sid, new Uint8Array(320)));
  conn.completeOpaqueStep(sid);
  const server = new Channel(SESSION_KEY, "server");
  conn.receiveData(encodeFrame(FrameType.WELCOME, sid, server.seal(FrameType.WELCOME, USER_ID)));
  const frames = sent(conn);
  assert.deepEqual(frames.map((f) => f.type), [FrameType.LOGIN_FINISH, FrameType.COMPLETE_REGISTRATION]);
  const complete = M.decodeCompleteRegistration(server.open(FrameType.COMPLETE_REGISTRATION, frames[1]!.payload));
  assert.deepEqual(complete.userId, USER_ID);
  assert.equal(unwrapStorageKey(masterKey(EXPORT_KEY), USER_ID, complete.encryptedStorageKey).length, 32);
  conn.receiveData(encodeFrame(FrameType.CLOSE, sid, server.seal(FrameType.CLOSE, M.encodeClose(ErrorCode.OK))));
  assert.deepEqual(types(conn.takeEvents()), ["opaque_step", "opaque_step", "registered"]);
});

test("registration: an export key that differs between registration and login is refused", () => {
  let calls = 0;
  const opaque = fakeOpaque(SESSION_KEY, EXPORT_KEY);
  const differing = { ...opaque, loginFinish: (...args: Parameters<typeof opaque.loginFinish>) => ({ ...opaque.loginFinish(...args)!, exportKey: new Uint8Array(64).fill(++calls) }) };
  const conn = new ClientConnection(differing, countingRandom());
  const sid = conn.openRegistration(NAME, "pw");
  conn.receiveData(encodeFrame(FrameType.REG_RESPONSE, sid, new Uint8Array(64)));
  conn.completeOpaqueStep(sid);
  conn.receiveData(encodeFrame(FrameType.LOGIN_RESPONSE, sid, new Uint8Array(320)));
  conn.completeOpaqueStep(sid);
  const frames = sent(conn);
  assert.equal(abortOf(frames[frames.length - 1]), ErrorCode.AUTHENTICATION_FAILED);
  assert.ok(!frames.some((f) => f.type === FrameType.LOGIN_FINISH));
});

test("a failed OPAQUE login is ABORT(AUTHENTICATION_FAILED), no LOGIN_FINISH", () => {
  const conn = new ClientConnection(fakeOpaque(SESSION_KEY, EXPORT_KEY, false), countingRandom());
  const sid = conn.openRequestSession(NAME, "pw");
  conn.receiveData(encodeFrame(FrameType.LOGIN_RESPONSE, sid, new Uint8Array(320)));
  conn.completeOpaqueStep(sid);
  const frames = sent(conn);
  assert.deepEqual([frames[0]?.type, abortOf(frames[1])], [FrameType.LOGIN_START, ErrorCode.AUTHENTICATION_FAILED]);
  const failed = conn.takeEvents().find((e) => e.type === "failed") as Extract<ClientEvent, { type: "failed" }>;
  assert.equal(failed.code, ErrorCode.AUTHENTICATION_FAILED);
});

test("session errors: unexpected frame, bad record, malformed payload, response not in flight", () => {
  {
    const conn = new ClientConnection(fakeOpaque(SESSION_KEY), countingRandom());
    const sid = conn.openRequestSession(NAME, "pw");
    sent(conn);
    conn.receiveData(encodeFrame(FrameType.REG_RESPONSE, sid, new Uint8Array(64)));
    assert.equal(abortOf(sent(conn)[0]), ErrorCode.UNEXPECTED_FRAME);
  }
  {
    // a record that fails to open: ABORT(BAD_RECORD) in clear, the connection goes on
    const { conn, sid, server } = established();
    conn.sendRequest(sid, utf8("x"));
    sent(conn);
    const good = respond(server, sid, 1, utf8("ok"));
    const bad = good.slice();
    bad[bad.length - 1]! ^= 1;
    conn.receiveData(bad);
    assert.equal(abortOf(sent(conn)[0]), ErrorCode.BAD_RECORD);
    assert.equal(conn.failed, null);
    assert.equal(conn.session(sid), undefined);
  }
  {
    // a replayed record (seq below the expected one)
    const { conn, sid, server } = established();
    conn.sendRequest(sid, utf8("x"));
    conn.sendRequest(sid, utf8("y"));
    sent(conn);
    const first = respond(server, sid, 1, utf8("ok"));
    conn.receiveData(first);
    conn.receiveData(first);
    assert.equal(abortOf(sent(conn)[0]), ErrorCode.BAD_RECORD);
  }
  {
    const { conn, sid, server } = established();
    conn.sendRequest(sid, utf8("x"));
    sent(conn);
    conn.receiveData(respond(server, sid, 7, utf8("?")));
    assert.equal(abortOf(sent(conn)[0]), ErrorCode.INVALID_REQUEST);
  }
  {
    const conn = new ClientConnection(fakeOpaque(SESSION_KEY), countingRandom());
    const sid = conn.openRequestSession(NAME, "pw");
    sent(conn);
    conn.receiveData(encodeFrame(FrameType.LOGIN_RESPONSE, sid, new Uint8Array(319)));
    assert.equal(abortOf(sent(conn)[0]), ErrorCode.MALFORMED);
  }
});

test("connection errors: bad header, frame on id 0, id never opened, GOAWAY on a session id", () => {
  const cases: [Uint8Array, ErrorCode][] = [
    [Uint8Array.of(2, 4, 0, 0, 0, 1, 0, 0, 0, 0), ErrorCode.UNSUPPORTED_VERSION],
    [encodeFrame(FrameType.LOGIN_RESPONSE, 0, new Uint8Array(320)), ErrorCode.BAD_SESSION_ID],
    [encodeFrame(FrameType.LOGIN_RESPONSE, 9, new Uint8Array(320)), ErrorCode.BAD_SESSION_ID],
    [encodeFrame(FrameType.GOAWAY, 1, M.encodeAbort({ code: ErrorCode.OK, reason: "" })), ErrorCode.MALFORMED],
    [Uint8Array.of(1, 0x05, 0, 0, 0, 1, 0, 1, 4, 1), ErrorCode.FRAME_TOO_LARGE],
  ];
  for (const [bytes, code] of cases) {
    const { conn, sid } = established();
    conn.receiveData(bytes);
    const [goaway] = sent(conn);
    assert.deepEqual([goaway?.type, goaway?.sessionId, M.decodeAbort(goaway!.payload).code], [FrameType.GOAWAY, 0, code]);
    assert.equal(conn.failed?.code, code);
    // the established session is kept for resumption
    assert.deepEqual(conn.takeDetachedSessions().map((s) => s.state), [State.DETACHED]);
    assert.equal(conn.session(sid), undefined);
    conn.receiveData(encodeFrame(FrameType.ABORT, sid, M.encodeAbort({ code: ErrorCode.OK, reason: "" })));
    assert.equal(conn.dataToSend().length, 0, "nothing read after a connection error");
  }
});

test("a lost connection: handshakes end with CONNECTION_LOST, established sessions detach", () => {
  const { conn, sid } = established();
  const opening = conn.openRequestSession(NAME, "pw");
  conn.sendRequest(sid, utf8("pending"));
  conn.connectionLost();
  const events = conn.takeEvents();
  const failed = events.find((e) => e.type === "failed") as Extract<ClientEvent, { type: "failed" }>;
  assert.deepEqual([failed.sessionId, failed.code], [opening, ErrorCode.CONNECTION_LOST]);
  const [detached] = conn.takeDetachedSessions();
  assert.equal(detached?.state, State.DETACHED);
  assert.deepEqual([...detached!.inFlight.keys()], [1]);
  assert.throws(() => conn.sendRequest(sid, utf8("x")), LocalProtocolError);
});

test("a received GOAWAY(OK) ends the connection without a reply; sessions stay resumable", () => {
  const { conn } = established();
  conn.receiveData(encodeFrame(FrameType.GOAWAY, 0, M.encodeAbort({ code: ErrorCode.OK, reason: "server shutting down" })));
  assert.equal(conn.dataToSend().length, 0);
  assert.equal(conn.failed?.code, ErrorCode.OK);
  assert.equal(conn.takeDetachedSessions().length, 1);
  // and the client's own close says GOAWAY(OK)
  const other = established().conn;
  other.close();
  const [goaway] = sent(other);
  assert.deepEqual([goaway?.type, M.decodeAbort(goaway!.payload).code], [FrameType.GOAWAY, ErrorCode.OK]);
});

test("resumption: RESUME on a new id, held requests and unanswered ones re-sent in the new epoch", () => {
  const { conn, sid, server } = established();
  conn.sendRequest(sid, utf8("answered"));
  conn.sendRequest(sid, utf8("unanswered"));
  sent(conn);
  conn.receiveData(respond(server, sid, 1, utf8("A")));
  conn.takeEvents();
  conn.connectionLost();
  const [session] = conn.takeDetachedSessions();
  const next = new ClientConnection(fakeOpaque(SESSION_KEY), countingRandom(1000));
  next.openRequestSession(NAME, "pw"); // id 1 on the new connection: the resume takes id 2
  sent(next);
  const rid = next.resumeSession(session!);
  assert.equal(rid, 2);
  const held = next.sendRequest(rid, utf8("held"));
  assert.equal(held, 3, "request ids go on across resumption");
  const [resume] = sent(next);
  assert.equal(resume?.type, FrameType.RESUME);
  assert.equal(resume!.payload.length, 80);
  const envelope = M.decodeResumeEnvelope(resume!.payload);
  assert.deepEqual(envelope.sessionHandle, server.sessionHandle);
  const body = M.decodeResume(server.openResume(M.encodeRecord(envelope.record)));
  assert.equal(body.receivedTotal, 2n, "WELCOME and one RESPONSE");
  assert.ok(body.receivedTotal <= server.sealedTotal);
  const serverNonce = new Uint8Array(32).fill(0x77);
  server.startEpoch(body.clientNonce, serverNonce);
  next.receiveData(encodeFrame(FrameType.RESUMED, rid, concat(serverNonce, server.seal(FrameType.RESUMED, new Uint8Array(0)))));
  assert.deepEqual(types(next.takeEvents()), ["resumed"]);
  const resent = sent(next).map((f) => M.decodeRequestMessage(server.open(FrameType.REQUEST, f.payload)));
  assert.deepEqual(resent.map((r) => [r.requestId, new TextDecoder().decode(r.body)]), [[2, "unanswered"], [3, "held"]]);
  // the next resumption uses the next resume seq; a RESUMED that does not open is refused
  next.connectionLost();
  const third = new ClientConnection(fakeOpaque(SESSION_KEY), countingRandom(2000));
  const again = third.resumeSession(next.takeDetachedSessions()[0]!);
  const [resume2] = sent(third);
  assert.equal(M.decodeResumeEnvelope(resume2!.payload).record.seq, 1n);
  third.receiveData(encodeFrame(FrameType.RESUMED, again, concat(serverNonce, server.seal(FrameType.RESUMED, new Uint8Array(0)))));
  assert.equal(abortOf(sent(third)[0]), ErrorCode.BAD_RECORD);
});

test("resumption: RATE_LIMITED defers (resume again later), UNKNOWN_SESSION ends, logout waits for RESUMED", () => {
  const { conn, server } = established();
  conn.connectionLost();
  const session = conn.takeDetachedSessions()[0]!;
  const next = new ClientConnection(fakeOpaque(SESSION_KEY), countingRandom(1000));
  const rid = next.resumeSession(session);
  sent(next);
  next.receiveData(encodeFrame(FrameType.ABORT, rid, M.encodeAbort({ code: ErrorCode.RATE_LIMITED, reason: "" })));
  assert.deepEqual(types(next.takeEvents()), ["resume_deferred"]);
  const [deferred] = next.takeDetachedSessions();
  assert.equal(deferred, session);
  const rid2 = next.resumeSession(session);
  assert.equal(rid2, rid + 1, "a new session id on the same connection");
  next.closeSession(rid2);
  assert.equal(session.state, State.CLOSE_AFTER_RESUMED);
  const [resume] = sent(next);
  const body = M.decodeResume(server.openResume(M.encodeRecord(M.decodeResumeEnvelope(resume!.payload).record)));
  const nonce = new Uint8Array(32).fill(1);
  server.startEpoch(body.clientNonce, nonce);
  next.receiveData(encodeFrame(FrameType.RESUMED, rid2, concat(nonce, server.seal(FrameType.RESUMED, new Uint8Array(0)))));
  const [close] = sent(next);
  assert.equal(M.decodeClose(server.open(FrameType.CLOSE, close!.payload)), ErrorCode.CLIENT_CLOSED);
  assert.deepEqual(types(next.takeEvents()), ["closed"]);
  // UNKNOWN_SESSION: the session is over
  const other = established();
  other.conn.connectionLost();
  const lost = other.conn.takeDetachedSessions()[0]!;
  const third = new ClientConnection(fakeOpaque(SESSION_KEY), countingRandom());
  const id = third.resumeSession(lost);
  third.receiveData(encodeFrame(FrameType.ABORT, id, M.encodeAbort({ code: ErrorCode.UNKNOWN_SESSION, reason: "" })));
  const failed = third.takeEvents()[0] as Extract<ClientEvent, { type: "failed" }>;
  assert.deepEqual([failed.type, failed.code, lost.state], ["failed", ErrorCode.UNKNOWN_SESSION, State.CLOSED]);
  assert.throws(() => third.resumeSession(lost), LocalProtocolError);
});

test("limits: in-flight requests, body size, sequence exhaustion keeps the last seq for CLOSE", () => {
  const { conn, sid } = established();
  for (let i = 0; i < conn.maxInFlight; i++) conn.sendRequest(sid, new Uint8Array(0));
  assert.throws(() => conn.sendRequest(sid, new Uint8Array(0)), /in flight/);
  const other = established();
  assert.throws(() => other.conn.sendRequest(other.sid, new Uint8Array(66560 - 28 + 1)), /larger/);
  other.conn.sendRequest(other.sid, new Uint8Array(66560 - 28));
  const session = other.conn.session(other.sid)!;
  session.channel!.sendSeq = MAX_SEQ - 1n;
  assert.throws(() => other.conn.sendRequest(other.sid, new Uint8Array(0)), /sequence numbers/);
  sent(other.conn);
  other.conn.closeSession(other.sid);
  const [close] = sent(other.conn);
  assert.equal(close?.type, FrameType.CLOSE);
  assert.equal(M.decodeRecord(close!.payload).seq, MAX_SEQ - 1n);
  assert.ok(toHex(close!.payload.subarray(0, 8)) === "fffffffffffffffe");
  assert.equal(HEADER_SIZE, 10);
});
