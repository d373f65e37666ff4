/** Errors of the core. None carries secret material in its message. */

import { ErrorCode, Status } from "./constants.js";

/** A peer broke the protocol: ``code`` is what goes in the ABORT or GOAWAY. */
export class ProtocolError extends Error {
  override name = "ProtocolError";
  constructor(
    readonly code: ErrorCode,
    message: string,
  ) {
    super(message);
  }
}

/** The application asked for something the protocol does not allow now (nothing was sent). */
export class LocalProtocolError extends Error {
  override name = "LocalProtocolError";
}

/** Data from the server failed verification (section 12.10). */
export class IntegrityFailure extends Error {
  override name = "IntegrityFailure";
}

/** The server answered an operation with a status other than OK. */
export class OperationRefused extends Error {
  override name = "OperationRefused";
  constructor(
    readonly status: Status,
    message?: string,
  ) {
    super(message ?? `request refused: ${Status[status]?.toLowerCase() ?? status}`);
  }
}

/** Named keys: a label that names no key (``notFound``) or several / another key's. */
export class LabelError extends Error {
  override name = "LabelError";
  constructor(
    message: string,
    readonly notFound: boolean = false,
  ) {
    super(message);
  }
}
