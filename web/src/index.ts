/** keymgmt's browser client: import this bundle, give it the key server's wss URL, and use
 * KeymgmtClient as in the Python client. TLS (and so the CA the key server's certificate
 * chains to) is the browser's. */
export * from "./core/index.js";
export * from "./client.js";
export * from "./ws.js";
export * from "./store.js";
export type { Connector, Transport } from "./transport.js";
export { KEY_STRETCHING, opaqueReady, serenityOpaque } from "./opaque.js";
