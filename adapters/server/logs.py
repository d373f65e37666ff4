"""The key server's log lines: text or JSON, timestamps in UTC.

Text: ``2026-11-30T04:15:01.123Z WARNING keymgmt.server: message``. JSON: one object per
line with ``time`` (the same UTC ISO-8601 form, ending in ``Z``), ``level``, ``logger``,
``message``, the structured fields a line carries (``peer``, ``event``), ``process``
when several processes write, and ``exception`` (the traceback) when there is one.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import TextIO

__all__ = ["LOG_FORMATS", "JSONFormatter", "UTCFormatter", "configure_logging", "utc_timestamp"]

LOG_FORMATS = ("text", "json")

#: The attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def utc_timestamp(created: float) -> str:
    """``created`` (seconds since the epoch) as ISO-8601 UTC with milliseconds and ``Z``."""
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class UTCFormatter(logging.Formatter):
    """The standard text formatter with UTC ISO-8601 timestamps."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_timestamp(record.created)


class JSONFormatter(logging.Formatter):
    """One JSON object per line (see the module's docstring)."""

    def __init__(self, with_process: bool = False) -> None:
        super().__init__()
        self.with_process = with_process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.with_process:
            line["process"] = record.process
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = (
                    value if isinstance(value, str | int | float | bool) or value is None else str(value)
                )
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: str, form: str, stream: TextIO, with_process: bool = False) -> None:
    """Send every log line to ``stream`` at ``level`` and above, as ``form`` (text or json)."""
    handler = logging.StreamHandler(stream)
    if form == "json":
        handler.setFormatter(JSONFormatter(with_process))
    else:
        process = "[%(process)d]" if with_process else ""
        handler.setFormatter(UTCFormatter(f"%(asctime)s %(levelname)s %(name)s{process}: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
