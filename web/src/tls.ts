/** The TLS binding for node (not in the browser bundle): keymgmt frames straight over a TLS 1.3
 * connection to the key server's TLS port, as the Python client speaks it. Browsers have no raw
 * TLS socket and use ws.ts; node scripts (the client conformance shim, the end-to-end tests) use
 * this one. The key server's certificate is checked against ``ca`` for ``serverName``. */

import { isIP } from "node:net";
import { checkServerIdentity, connect } from "node:tls";
import type { Connector, Transport } from "./transport.js";

export interface TlsOptions {
  /** PEM of the CA(s) to trust instead of node's default list. */
  ca?: string | Buffer;
  /** The name the certificate must carry (default: ``host``). */
  serverName?: string;
  /** Give up opening after this many milliseconds (default 10 s). */
  openTimeoutMs?: number;
}

/** A Connector that opens a TLS 1.3 connection to ``host:port`` each time it is called. */
export function tlsConnector(host: string, port: number, options: TlsOptions = {}): Connector {
  const serverName = options.serverName ?? host;
  return () =>
    new Promise<Transport>((resolve, reject) => {
      const socket = connect({
        host,
        port,
        ca: options.ca,
        // SNI carries a name, never an address; the certificate is checked against serverName either way
        ...(isIP(serverName) !== 0 ? {} : { servername: serverName }),
        checkServerIdentity: (_host, cert) => checkServerIdentity(serverName, cert),
        minVersion: "TLSv1.3",
      });
      let open = false;
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`no TLS connection within ${(options.openTimeoutMs ?? 10_000) / 1000} s`));
      }, options.openTimeoutMs ?? 10_000);
      const transport: Transport = {
        onData: null,
        onClose: null,
        send: (frame) => void socket.write(frame),
        close: () => socket.destroy(),
      };
      socket.once("secureConnect", () => {
        clearTimeout(timer);
        open = true;
        resolve(transport);
      });
      socket.on("data", (data: Buffer) => transport.onData?.(new Uint8Array(data.buffer, data.byteOffset, data.byteLength)));
      socket.on("error", (error) => {
        clearTimeout(timer);
        if (!open) reject(error);
      });
      socket.on("close", () => {
        clearTimeout(timer);
        if (open) transport.onClose?.("TLS connection closed");
        else reject(new Error("the connection closed before TLS was set up"));
      });
    });
}
