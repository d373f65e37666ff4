/** The WebSocket adapter (src/ws.ts) against a scripted WebSocket: the subprotocol and no
 * extensions are required, binary messages are the byte stream, a text message ends it. */

import { test } from "node:test";
import assert from "node:assert/strict";
import { SUBPROTOCOL, openWebSocket, type WebSocketConstructor, type WebSocketLike } from "../src/ws.js";

class FakeSocket implements WebSocketLike {
  static last: FakeSocket | null = null;
  binaryType = "blob";
  protocol = "";
  extensions = "";
  readyState = 0;
  sent: Uint8Array[] = [];
  closed: [number | undefined, string | undefined] | null = null;
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: { data: unknown }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;
  constructor(
    readonly url: string,
    readonly protocols?: string | string[],
  ) {
    FakeSocket.last = this;
  }
  send(data: Uint8Array): void {
    this.sent.push(data);
  }
  close(code?: number, reason?: string): void {
    this.closed = [code, reason];
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code: code ?? 1005, reason: reason ?? "" }));
  }
  accept(protocol = SUBPROTOCOL, extensions = ""): void {
    this.protocol = protocol;
    this.extensions = extensions;
    this.readyState = 1;
    this.onopen?.({});
  }
}

const Impl = FakeSocket as unknown as WebSocketConstructor;

test("opens with subprotocol keymgmt.v1 and carries binary messages as bytes, one frame per send", async () => {
  const opening = openWebSocket("wss://keys.test/keymgmt", { WebSocket: Impl });
  const socket = FakeSocket.last!;
  assert.deepEqual([socket.protocols, socket.binaryType], [[SUBPROTOCOL], "arraybuffer"]);
  socket.accept();
  const transport = await opening;
  const received: number[][] = [];
  let closedWith = "";
  transport.onData = (data) => received.push([...data]);
  transport.onClose = (reason) => (closedWith = reason);
  transport.send(Uint8Array.of(1, 2, 3));
  assert.deepEqual(socket.sent.map((b) => [...b]), [[1, 2, 3]]);
  socket.onmessage!({ data: Uint8Array.of(9, 8).buffer });
  assert.deepEqual(received, [[9, 8]]);
  socket.onmessage!({ data: "text" });
  assert.deepEqual(socket.closed, [1003, "binary messages only"]);
  await new Promise((r) => setTimeout(r, 0));
  assert.match(closedWith, /1003/);
});

test("another subprotocol, none, or an extension fails the connection", async () => {
  for (const [protocol, extensions] of [["other", ""], ["", ""], [SUBPROTOCOL, "permessage-deflate"]] as const) {
    const opening = openWebSocket("wss://keys.test/keymgmt", { WebSocket: Impl });
    FakeSocket.last!.accept(protocol, extensions);
    await assert.rejects(opening, /subprotocol|extensions/);
    assert.equal(FakeSocket.last!.closed?.[0], 1002);
  }
});

test("a socket that closes before opening is a failed connect, not a transport", async () => {
  const opening = openWebSocket("wss://keys.test/keymgmt", { WebSocket: Impl, openTimeoutMs: 1000 });
  FakeSocket.last!.onerror!({});
  await assert.rejects(opening, /cannot open a WebSocket/);
});
