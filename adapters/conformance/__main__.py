"""``python -m keymgmt.adapters.conformance``: the conformance harness from a shell.

``server --target HOST:PORT --ca CA.pem`` runs the server conformance machine against a
running key server; ``client --client-cmd '...'`` runs a client under test against the
scripted server. Exit status: 0 conforming, 1 a violation (its transcript is printed),
2 a usage error, 3 the target cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..tls import PKIError
from .broken import HONEST_VARIANTS, SUMMARIES, VARIANTS, serve_broken
from .client import DEFAULT_SCENARIOS, ClientScenarioResult, default_scenarios, run_client_conformance
from .link import Target, parse_target
from .server import ConformanceFailure, ServerRunSettings, run_server_conformance

EXAMPLES = """\
examples:
  python -m keymgmt.adapters.conformance server --target 127.0.0.1:7443 --ca srv/ca.pem
  python -m keymgmt.adapters.conformance server --target keys.example.org:7443 --ca ca.pem \\
      --max-examples 100 --time-limit 600 --invitation-file invitation.txt
  python -m keymgmt.adapters.conformance broken-server replay --config srv/keymgmt-server.toml
  python -m keymgmt.adapters.conformance client --client-cmd \\
      'keymgmt --server {address} --ca {ca} --account {account} --password-file {password_file} \\
       --no-local-store generate'
"""


def _parser() -> argparse.ArgumentParser:
    # the server's bounds default to ServerRunSettings' (the README states those)
    run = ServerRunSettings()
    parser = argparse.ArgumentParser(
        prog="python -m keymgmt.adapters.conformance",
        description="Test a keymgmt server or client implementation against docs/protocol.md.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser(
        "server",
        help="drive a running key server with the conformance state machine",
        description="Register throwaway accounts (named cf-<run>-...@example.org), log in, run every "
        "operation, cut connections and resume, misbehave on the wire, and check every answer against "
        "docs/protocol.md. A violation is shrunk and printed as a transcript. Use a test server: the "
        "accounts stay.",
    )
    server.add_argument("--target", required=True, metavar="HOST:PORT", help="the key server")
    server.add_argument(
        "--ca", type=Path, help="CA certificate that signs the server's (default: the system store)"
    )
    server.add_argument(
        "--server-name", help="name to verify in the certificate (default: the target's host)"
    )
    server.add_argument(
        "--invitation-file",
        type=Path,
        help="a registration token for a server that requires one (keymgmt-server invite --valid-for 1h, "
        "unbound to a name); env KEYMGMT_INVITATION",
    )
    server.add_argument(
        "--max-examples",
        type=int,
        default=run.max_examples,
        help=f"runs of the machine at most (default {run.max_examples})",
    )
    server.add_argument(
        "--steps", type=int, default=run.steps, help=f"steps per run at most (default {run.steps})"
    )
    server.add_argument(
        "--time-limit",
        type=float,
        default=run.time_limit,
        help=f"seconds after which no new batch of {run.batch} runs starts "
        f"(default {run.time_limit:g}; not with --derandomize)",
    )
    server.add_argument(
        "--shrink-time-limit",
        type=float,
        default=run.shrink_time_limit,
        help=f"seconds to shrink a failure at most (default {run.shrink_time_limit:g})",
    )
    server.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for each answer (default 5)"
    )
    server.add_argument("--derandomize", action="store_true", help="the same runs every time")
    server.add_argument("--verbose", action="store_true", help="print every step as it runs")
    client = sub.add_parser(
        "client",
        help="run a client under test against a scripted server",
        description="Start a scripted key server on 127.0.0.1 (TLS 1.3, a CA made for the run) and run "
        "--client-cmd once per scenario: it must succeed where the server is honest, fail where it is not, "
        "and end within --timeout either way. Placeholders in the command: {host} {port} {address} {ca} "
        "{account} {password_file} {workdir}.",
    )
    client.add_argument("--client-cmd", help="the client's command line, with placeholders")
    client.add_argument(
        "--scenario", action="append", choices=DEFAULT_SCENARIOS, help="only this scenario (repeatable)"
    )
    client.add_argument("--timeout", type=float, default=20.0, help="seconds a run may take (default 20)")
    client.add_argument("--list", action="store_true", help="list the scenarios and exit")
    client.add_argument(
        "--show-output", action="store_true", help="print the client's output of failed scenarios"
    )
    broken = sub.add_parser(
        "broken-server",
        help="run keymgmt-server serve with one protection broken on purpose, to see a violation",
        description="Run the real keymgmt-server serve (one process) with one protection taken out, "
        "so that the server machine has a bug to find: point `server` at it and it fails with a shrunk "
        "transcript. For testing only, never for real users. --list shows the variants.",
    )
    broken.add_argument("--list", action="store_true", help="list the variants and exit")
    broken.add_argument("variant", nargs="?", metavar="VARIANT", help="which protection to break (--list)")
    broken.add_argument(
        "serve_args",
        nargs=argparse.REMAINDER,
        metavar="SERVE-ARGS",
        help="keymgmt-server serve's arguments, e.g. --config srv/keymgmt-server.toml",
    )
    return parser


def _broken_server(args: argparse.Namespace) -> int:
    if args.list:
        for name in VARIANTS:
            print(f"{name:16} {'policy' if name in HONEST_VARIANTS else 'broken':7} {SUMMARIES[name]}")
        return 0
    if args.variant not in VARIANTS:
        what = "needs a VARIANT" if args.variant is None else f"no variant {args.variant!r}"
        print(f"error: broken-server {what}: one of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    return serve_broken(args.variant, args.serve_args)


def _server(args: argparse.Namespace) -> int:
    try:
        host, port = parse_target(args.target)
    except ValueError as exc:
        print(f"error: --target: {exc}", file=sys.stderr)
        return 2
    token = b""
    if args.invitation_file is not None:
        try:
            token = args.invitation_file.read_bytes().strip()
        except OSError as exc:
            print(f"error: --invitation-file: {exc}", file=sys.stderr)
            return 2
    elif os.environ.get("KEYMGMT_INVITATION"):
        token = os.environ["KEYMGMT_INVITATION"].strip().encode()
    target = Target(host, port, ca=args.ca, server_name=args.server_name, timeout=args.timeout, token=token)
    try:
        target.connect().close()
    except (OSError, ValueError, PKIError) as exc:
        print(f"error: cannot reach {target.address} over TLS 1.3: {exc}", file=sys.stderr)
        return 3
    settings = ServerRunSettings(
        max_examples=args.max_examples,
        steps=args.steps,
        time_limit=args.time_limit,
        shrink_time_limit=args.shrink_time_limit,
        derandomize=args.derandomize,
        verbose=args.verbose,
    )
    print(
        f"server conformance: {target.address}, "
        f"at most {settings.max_examples} runs of {settings.steps} steps"
    )
    try:
        report = run_server_conformance(target, settings)
    except ConformanceFailure as failure:
        print("\nThe server violated docs/protocol.md. Hypothesis's shrunk run:\n")
        print(failure.hypothesis_report)
        print("\nWhat went over the wire (-> sent, <- received, = what the client made of it):\n")
        print(failure.transcript)
        print(f"\nVIOLATION: {failure.violation}")
        return 1
    print(
        f"passed: {report.examples} runs, {report.steps} steps in {report.seconds:.1f} s; "
        f"{len(report.rules)} kinds of step; {report.policy_refusals} refused by the server's policy; "
        f"{sum(report.skipped.values())} steps picked with nothing to act on (skipped)"
    )
    return 0


def _client(args: argparse.Namespace) -> int:
    if args.list:
        for scenario in default_scenarios():
            print(f"{scenario.name:26} expect {scenario.expect:8} {scenario.description}")
        return 0
    if not args.client_cmd:
        print("error: client needs --client-cmd (or --list)", file=sys.stderr)
        return 2

    def show(result: ClientScenarioResult) -> None:
        mark = {"pass": "ok  ", "fail": "FAIL", "not exercised": "n/a "}[result.verdict]
        code = "timeout" if result.exit_code is None else f"exit {result.exit_code}"
        line = f"{mark} {result.scenario:26} expect {result.expect:8} {code:8} {result.seconds:5.1f} s"
        print(line + (f"  {result.reason}" if result.reason else ""), flush=True)
        if result.verdict == "fail":
            print("\n".join("     " + entry for entry in result.log[-40:]))
            if args.show_output:
                print(
                    "     client output:\n"
                    + "\n".join("       " + x for x in result.output.splitlines()[-20:])
                )

    report = run_client_conformance(
        args.client_cmd, scenarios=args.scenario, timeout=args.timeout, on_result=show
    )
    failed = [r.scenario for r in report.results if r.verdict == "fail"]
    exercised = sum(r.verdict != "not exercised" for r in report.results)
    print(
        f"{'passed' if not failed else 'FAILED'}: {exercised} of {len(report.results)} scenarios exercised"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "broken-server":
        return _broken_server(args)
    return _server(args) if args.command == "server" else _client(args)


if __name__ == "__main__":
    sys.exit(main())
