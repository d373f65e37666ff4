/** The WebSocket binding: each keymgmt frame travels as one binary WebSocket message over wss
 * (TLS is the browser's: it checks the key server's certificate against the trust store the
 * user's browser has). Received messages are fed to the core as a byte stream, so a message
 * carrying several frames or part of one is read the same. */

import type { Connector, Transport } from "./transport.js";

/** The WebSocket subprotocol of the keymgmt binding (Sec-WebSocket-Protocol). */
export const SUBPROTOCOL = "keymgmt.v1";
/** The key server's WebSocket path. */
export const WS_PATH = "/keymgmt";

/** The parts of the browser's WebSocket this adapter uses (the ``ws`` package has them too). */
export interface WebSocketLike {
  binaryType: string;
  readonly protocol: string;
  /** The negotiated extensions (none is allowed: compression before encryption leaks lengths). */
  readonly extensions?: string | object;
  readonly readyState: number;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface WebSocketOptions {
  /** Subprotocols to offer (default: ``keymgmt.v1``). */
  protocols?: string[];
  /** Another WebSocket implementation (e.g. the ``ws`` package in node). */
  WebSocket?: WebSocketConstructor;
  /** Give up opening after this many milliseconds (default 10 s). */
  openTimeoutMs?: number;
}

function toBytes(data: unknown): Uint8Array | null {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return null; // a text message is not part of the binding
}

/** Open one WebSocket to ``url`` (``wss://host:port/keymgmt``) as a Transport. */
export function openWebSocket(url: string, options: WebSocketOptions = {}): Promise<Transport> {
  const Impl = options.WebSocket ?? (globalThis as unknown as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (!Impl) return Promise.reject(new Error("no WebSocket implementation here"));
  const protocols = options.protocols ?? [SUBPROTOCOL];
  return new Promise((resolve, reject) => {
    const socket = new Impl(url, protocols);
    socket.binaryType = "arraybuffer";
    let opened = false;
    let ended = false;
    const transport: Transport = {
      onData: null,
      onClose: null,
      send(frame) {
        if (socket.readyState === 1) socket.send(frame);
      },
      close() {
        socket.close(1000, "client closing");
      },
    };
    const end = (reason: string) => {
      if (ended) return;
      ended = true;
      clearTimeout(timer);
      if (opened) transport.onClose?.(reason);
      else reject(new Error(`cannot open a WebSocket to ${url}: ${reason}`));
    };
    const timer = setTimeout(() => {
      if (!opened) {
        end("timed out");
        socket.close();
      }
    }, options.openTimeoutMs ?? 10_000);
    socket.onopen = () => {
      if (protocols.length > 0 && !protocols.includes(socket.protocol)) {
        end(`the server chose subprotocol '${socket.protocol}'`);
        socket.close(1002, "subprotocol");
        return;
      }
      const extensions = typeof socket.extensions === "string" ? socket.extensions : Object.keys(socket.extensions ?? {}).join(", ");
      if (extensions) {
        end(`the server selected WebSocket extensions (${extensions}); the binding has none`);
        socket.close(1002, "extensions");
        return;
      }
      opened = true;
      clearTimeout(timer);
      resolve(transport);
    };
    socket.onmessage = (event) => {
      const bytes = toBytes(event.data);
      if (bytes === null) {
        socket.close(1003, "binary messages only");
        return;
      }
      transport.onData?.(bytes);
    };
    socket.onerror = () => end("WebSocket error");
    socket.onclose = (event) => end(`WebSocket closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`);
  });
}

/** A Connector for the high-level client: a fresh WebSocket to ``url`` each time. */
export function webSocketConnector(url: string, options: WebSocketOptions = {}): Connector {
  return () => openWebSocket(url, options);
}
