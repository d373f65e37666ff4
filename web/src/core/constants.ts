/** Protocol constants and enumerations (docs/protocol.md sections 2, 3.2, 5.2, 7.1, 12.1, 12.3). */

export const CHANNEL_SALT = "keymgmt v1 channel";
export const LABEL_HANDLE = "keymgmt v1 session handle";
export const LABEL_C2S_KEY = "keymgmt v1 client-to-server key";
export const LABEL_C2S_IV = "keymgmt v1 client-to-server iv";
export const LABEL_S2C_KEY = "keymgmt v1 server-to-client key";
export const LABEL_S2C_IV = "keymgmt v1 server-to-client iv";
export const MASTER_KEY_INFO = "OPAQUE-derived Lock Keeper master key";
export const STORAGE_KEY_AD_SUFFIX = "storage key";
export const LABEL_RESUME_KEY = "keymgmt v1 resume key";
export const LABEL_RESUME_IV = "keymgmt v1 resume iv";
export const LABEL_EPOCH = "keymgmt v1 key epoch";

export const PROTOCOL_VERSION = 1;
export const HEADER_SIZE = 10;
export const DEFAULT_MAX_PAYLOAD = 66560;
export const MIN_MAX_PAYLOAD = 1024;
export const MAX_SESSION_ID = 0x7fffffff;
export const REGISTRATION_REQUEST_SIZE = 32;
export const REGISTRATION_RESPONSE_SIZE = 64;
export const REGISTRATION_UPLOAD_SIZE = 192;
export const CREDENTIAL_REQUEST_SIZE = 96;
export const CREDENTIAL_RESPONSE_SIZE = 320;
export const CREDENTIAL_FINALIZATION_SIZE = 64;
export const USER_ID_SIZE = 16;
export const SESSION_HANDLE_SIZE = 16;
export const TAG_SIZE = 16;
export const ENCRYPTED_STORAGE_KEY_SIZE = 60;
export const ACCOUNT_NAME_MAX = 255;
export const REASON_MAX = 255;
export const REGISTRATION_TOKEN_MAX = 1024;
export const KEY_SIZE = 32;
export const NONCE_SIZE = 12;
export const MAX_SEQ = (1n << 64n) - 1n;
export const RESUME_NONCE_SIZE = 32;
export const DEFAULT_MAX_IN_FLIGHT = 16;
export const MAX_REQUEST_ID = 0xffffffff;
/** OPAQUE's key and export key sizes (section 6). */
export const OPAQUE_KEY_SIZE = 64;
/** The longest password OPAQUE takes (its input carries a u16 length). */
export const MAX_PASSWORD_SIZE = 65535;

export enum FrameType {
  GOAWAY = 0x00,
  REG_START = 0x01,
  REG_RESPONSE = 0x02,
  REG_UPLOAD = 0x03,
  LOGIN_START = 0x04,
  LOGIN_RESPONSE = 0x05,
  LOGIN_FINISH = 0x06,
  ABORT = 0x0f,
  WELCOME = 0x20,
  COMPLETE_REGISTRATION = 0x21,
  REQUEST = 0x22,
  RESPONSE = 0x23,
  CLOSE = 0x24,
  RESUME = 0x25,
  RESUMED = 0x26,
}

export function isSealed(type: FrameType): boolean {
  return type >= 0x20;
}

export enum Direction {
  CLIENT_TO_SERVER = 1,
  SERVER_TO_CLIENT = 2,
}

export enum ErrorCode {
  OK = 0,
  MALFORMED = 1,
  UNEXPECTED_FRAME = 2,
  UNSUPPORTED_VERSION = 3,
  FRAME_TOO_LARGE = 4,
  BAD_RECORD = 5,
  AUTHENTICATION_FAILED = 6,
  THROTTLED = 7,
  ACCOUNT_EXISTS = 8,
  INVALID_ACCOUNT_NAME = 9,
  INVALID_REQUEST = 10,
  IDLE_TIMEOUT = 11,
  LIFETIME_EXPIRED = 12,
  REQUEST_LIMIT = 13,
  UNKNOWN_SESSION = 14,
  LIMIT_EXCEEDED = 15,
  BAD_SESSION_ID = 16,
  INTERNAL_ERROR = 17,
  CLIENT_CLOSED = 18,
  CONNECTION_LOST = 19,
  HANDSHAKE_TIMEOUT = 20,
  SEQUENCE_EXHAUSTED = 21,
  RATE_LIMITED = 22,
  NOT_AUTHORIZED = 23,
}

/** Whether ``value`` names a member of a numeric enum. */
export function isEnumValue(enumObject: object, value: number): boolean {
  return typeof (enumObject as Record<number, unknown>)[value] === "string";
}

// ---- operations (section 12)

export const KEY_ID_DOMAIN = "keymgmt v1 key id";
export const KEY_ID_CONTRIBUTION_DOMAIN = "keymgmt v1 key id contributions";
export const IMPORTED_KEY_AD_SUFFIX = "imported key";
export const LABEL_AD_DOMAIN = "keymgmt v1 key label";
export const AUDIT_CHAIN_DOMAIN = "keymgmt v1 audit chain";

export const KEY_ID_SIZE = 16;
export const KEY_ID_NONCE_SIZE = 32;
export const GENERATED_SECRET_SIZE = 32;
export const MAX_SECRET_SIZE = 65536;
export const MAX_SHORT_PORTABLE_SIZE = 255;
export const PORTABLE_LONG_MARKER = 0;
export const PORTABLE_LONG_VERSION = 1;
export const PORTABLE_LONG_HEADER_SIZE = 6;
export const SEALED_OVERHEAD = 28;
export const MAX_SEALED_SIZE = MAX_SECRET_SIZE + SEALED_OVERHEAD;
export const MAX_NEXT_KEY_IDS = 4;
export const STORE_RETRIES = 2;
export const MAX_AUDIT_PAGE = 256;
/** Most of the user's entries one AUDIT request reads (section 12.9): a page may hold fewer
 * than its limit, or none, before the log's end; only next_cursor 0 ends a walk. */
export const MAX_AUDIT_SCAN = 16 * MAX_AUDIT_PAGE;
export const MAX_LIST_PAGE = 512;
export const MAX_LABEL_SIZE = 64;
export const MAX_SEALED_LABEL_SIZE = MAX_LABEL_SIZE + SEALED_OVERHEAD;
/** A label is padded with zero bytes to a multiple of this before it is sealed (section 12.6). */
export const LABEL_PAD_SIZE = 32;
export const AUDIT_HASH_SIZE = 32;
export const MAX_AUDIT_KEY_IDS = 1024;
export const MAX_TIME = (1n << 63n) - 1n;
/** ``context`` byte of an audit entry that has none. */
export const NO_CONTEXT = 0xff;

export enum Op {
  RETRIEVE_STORAGE_KEY = 1,
  CREATE_KEY_ID = 2,
  STORE_SECRET = 3,
  RETRIEVE = 4,
  AUDIT = 5,
  LIST_KEYS = 6,
  DELETE_KEY = 7,
  CHANGE_PASSWORD_START = 8,
  CHANGE_PASSWORD_FINISH = 9,
  DELETE_ACCOUNT = 10,
  RENAME_KEY = 12,
}

export enum Status {
  OK = 0,
  NOT_FOUND = 1,
  WRONG_USER = 2,
  INVALID = 3,
  INTERNAL_ERROR = 4,
  LIMIT_REACHED = 5,
  /** The user's requests passed the key server's per-user rate: nothing was done; send it again later. */
  RATE_LIMITED = 6,
}

export enum SecretKind {
  GENERATED = 1,
  IMPORTED = 2,
}

export enum Context {
  NULL = 0,
  LOCAL_ONLY = 1,
  EXPORT = 2,
}

export enum AuditType {
  SYSTEM_ONLY = 1,
  KEY_ONLY = 2,
  ALL = 3,
}

export enum Action {
  REGISTER = 1,
  LOGIN = 2,
  LOGOUT = 3,
  RETRIEVE_STORAGE_KEY = 4,
  CREATE_KEY_ID = 5,
  GENERATE = 6,
  IMPORT = 7,
  RETRIEVE = 8,
  LIST_KEYS = 9,
  DELETE_KEY = 10,
  AUDIT = 11,
  SESSION_EXPIRED = 12,
  MALFORMED_REQUEST = 13,
  LOGIN_THROTTLED = 14,
  CHANGE_PASSWORD = 15,
  DELETE_ACCOUNT = 16,
  CHANGE_PASSWORD_START = 17,
  RENAME_KEY = 20,
}

/** The actions that ``KEY_ONLY`` selects (section 12.3, "key action"). */
export const KEY_ACTIONS: ReadonlySet<Action> = new Set([
  Action.CREATE_KEY_ID,
  Action.GENERATE,
  Action.IMPORT,
  Action.RETRIEVE,
  Action.LIST_KEYS,
  Action.DELETE_KEY,
  Action.RENAME_KEY,
]);

export enum Outcome {
  SUCCESS = 0,
  FAILURE = 1,
}
