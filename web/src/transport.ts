/** What the high-level client needs of a connection to the key server: whole frames out,
 * bytes in (in any chunking), and word when it ends. ``ws.ts`` gives one over WebSocket. */

export interface Transport {
  /** Send one whole keymgmt frame. */
  send(frame: Uint8Array): void;
  /** Close the transport; ``onClose`` is called once it has. */
  close(): void;
  /** Bytes from the key server (set by the client). */
  onData: ((data: Uint8Array) => void) | null;
  /** The transport ended (set by the client); called at most once. */
  onClose: ((reason: string) => void) | null;
}

/** Opens a new transport to the key server; called again to reconnect. */
export type Connector = () => Promise<Transport>;
