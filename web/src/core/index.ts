/** The keymgmt client core: pure, no I/O, no clock. */
export * from "./bytes.js";
export * from "./constants.js";
export * from "./errors.js";
export * from "./framing.js";
export * from "./messages.js";
export * from "./crypto.js";
export * from "./ops.js";
export * from "./opaque.js";
export * from "./connection.js";
export * from "./secretops.js";
export * from "./passwordcheck.js";
