"""Conformance harness: keymgmt's Hypothesis machinery pointed at *another* implementation
over the wire (needs the ``testing`` extra: ``pip install 'keymgmt[testing]'``).

- :func:`run_server_conformance` drives a key server at ``HOST:PORT`` over TLS 1.3 with a
  state machine that checks every answer against a model of docs/protocol.md;
- :func:`run_client_conformance` runs a scripted TLS server and a client command under test
  against it, with valid, adversarial and truncated answers.

From a shell: ``python -m keymgmt.adapters.conformance server --target HOST:PORT --ca CA.pem``
and ``python -m keymgmt.adapters.conformance client --client-cmd '...'``;
``python -m keymgmt.adapters.conformance broken-server VARIANT --config FILE`` serves our
key server with one protection broken on purpose (:mod:`.broken`), to see the machine
catch it. See the README,
"Testing your implementation". Importing :mod:`keymgmt.adapters` does not import this
package (nor Hypothesis).
"""

try:
    import hypothesis  # noqa: F401 - only to say clearly what is missing
except ImportError as exc:  # pragma: no cover - the dev install has it
    raise ImportError(
        "keymgmt.adapters.conformance needs Hypothesis: pip install 'keymgmt[testing]'"
    ) from exc

from .client import (
    ClientReport,
    ClientScenarioResult,
    Scenario,
    ScriptedServer,
    default_scenarios,
    run_client_conformance,
)
from .link import Link, Target, Transcript, parse_target
from .server import ConformanceFailure, ServerReport, ServerRunSettings, run_server_conformance

__all__ = [
    "ClientReport",
    "ClientScenarioResult",
    "ConformanceFailure",
    "Link",
    "Scenario",
    "ScriptedServer",
    "ServerReport",
    "ServerRunSettings",
    "Target",
    "Transcript",
    "default_scenarios",
    "parse_target",
    "run_client_conformance",
    "run_server_conformance",
]
