"""Run the key server (``KeyServerRuntime``) on a chosen anyio backend: asyncio or trio.

``keymgmt-server serve`` always runs on asyncio (``anyio.run``'s default); the load
test needs the server on trio as well, so this script does what ``serve`` does
(same config loading, same "listening on HOST:PORT" line on stdout, graceful
shutdown on SIGTERM/SIGINT) with a ``--backend`` argument::

    python tests/support/serve_backend.py --backend trio --config srv/keymgmt-server.toml
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anyio

from keymgmt.adapters.cli.server import serve_until_signal
from keymgmt.adapters.server.config import load_settings
from keymgmt.adapters.server.runtime import KeyServerRuntime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    runtime = KeyServerRuntime(load_settings(args.config))
    anyio.run(serve_until_signal, runtime, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
