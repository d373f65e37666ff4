"""The client conformance mode against the TypeScript client (web/, issue 18): the real
``KeymgmtClient`` of web/src as a command line (web/scripts/conformance-client.ts, bundled for
node), over node's TLS straight to the scripted server's TLS port (a TCP shim: node has raw TLS
sockets, so no WebSocket bridge is needed). It passes every scenario, and copies of it with the
record tag check or the sequence check taken out (patched in a scratch copy of web/, never in
web/ itself) fail exactly the scenarios that need them.

Without node 20 or newer (or web/) the tests are skipped with the reason; KEYMGMT_REQUIRE_WEB=1
makes that a failure, as in tests/repo/test_web.py.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from keymgmt.adapters.conformance import default_scenarios, run_client_conformance
from scripts.web_demo import WEB, WebUnavailableError, build_web, find_node

REQUIRED = os.environ.get("KEYMGMT_REQUIRE_WEB") == "1"
ARGS = "--server {address} --ca {ca} --account {account} --password-file {password_file} generate --retrieve"
BUNDLE = Path("build") / "conformance-client.mjs"
#: The shim's exit status for an unexpected error (a crash is not a refusal).
UNEXPECTED = 70

#: variant -> (file under web/src, the check as it is, what the patched copy has instead)
PATCHES: dict[str, tuple[str, str, str]] = {
    "no-tag-check": (
        "core/crypto.ts",
        "  if (plaintext === null) throw new ProtocolError(ErrorCode.BAD_RECORD, "
        '"record failed authentication");',
        # decrypted anyway: ChaCha20 from block 1, the tag ignored (NET-7 broken)
        "  if (plaintext === null) return { plaintext: chacha20(key, recordNonce(iv, seq), "
        "ciphertext.subarray(0, ciphertext.length - 16), undefined, 1), seq };",
    ),
    "no-sequence-check": (
        "core/crypto.ts",
        "  if (atLeast ? seq < expected : seq !== expected) throw new ProtocolError("
        'ErrorCode.BAD_RECORD, "record out of sequence");',
        # any sequence number opens (replays and gaps pass: protocol.md 5.3 broken)
        "",
    ),
}
CHACHA_IMPORT = 'import { chacha20poly1305 } from "@noble/ciphers/chacha.js";'
CHACHA_IMPORT_PATCHED = 'import { chacha20, chacha20poly1305 } from "@noble/ciphers/chacha.js";'
#: variant -> the scenarios it must fail (and only those, among the ones run here)
BROKEN = {
    "no-tag-check": {"welcome-bit-flip", "response-bit-flip"},
    "no-sequence-check": {"response-replayed-seq", "response-seq-gap"},
}
SCENARIOS = ["honest", "welcome-bit-flip", "response-bit-flip", "response-replayed-seq", "response-seq-gap"]


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (KEYMGMT_REQUIRE_WEB=1 makes this a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node() -> str:
    """node, with web/'s bundles (the conformance shim among them) built."""
    try:
        found, _ = find_node()
        build_web()
    except WebUnavailableError as exc:
        _unavailable(f"{exc}: the TypeScript client's conformance run did not happen")
    return found


def _command(node: str, web: Path) -> str:
    return f"{shlex.quote(node)} {shlex.quote(str(web / BUNDLE))} {ARGS}"


def test_the_typescript_client_passes_every_scenario(node: str, tmp_path: Path) -> None:
    report = run_client_conformance(_command(node, WEB), timeout=30, workdir=tmp_path)
    assert report.passed, [
        (r.scenario, r.reason, r.output[-500:]) for r in report.results if r.verdict == "fail"
    ]
    # generate --retrieve reaches every scenario, the tampered secret among them
    assert {r.scenario: r.verdict for r in report.results} == {s.name: "pass" for s in default_scenarios()}
    for result in report.results:
        if result.expect == "success":
            assert result.exit_code == 0
            assert "retrieved 32 bytes from the key server" in result.output
        else:  # a refusal the client made, not a crash or a usage error
            assert result.exit_code not in (0, 2, UNEXPECTED, None), (result.scenario, result.output)
            assert "keymgmt-web: error: " in result.output and "unexpected" not in result.output
    by_name = {r.scenario: r for r in report.results}
    assert by_name["secret-tampered"].exit_code == 1  # IntegrityError
    assert by_name["forged-login-response"].exit_code == 3  # AuthenticationError
    password = (tmp_path / "password").read_text().strip()
    assert not any(password in r.output for r in report.results)


def _broken_copy(node: str, variant: str, base: Path) -> Path:
    """A scratch copy of web/ (sources and scripts, web/'s node_modules linked) with one check
    taken out, and its shim bundled."""
    web = base / "web"
    shutil.copytree(WEB / "src", web / "src")
    shutil.copytree(WEB / "scripts", web / "scripts")
    shutil.copy(WEB / "package.json", web / "package.json")
    (web / "node_modules").symlink_to(WEB / "node_modules", target_is_directory=True)
    name, check, instead = PATCHES[variant]
    source = web / "src" / name
    text = source.read_text()
    assert text.count(check) == 1, f"the check to take out is no longer in web/src/{name}: update PATCHES"
    text = text.replace(check, instead)
    if "chacha20(" in instead:
        assert CHACHA_IMPORT in text
        text = text.replace(
            CHACHA_IMPORT, 'import { chacha20, chacha20poly1305 } from "@noble/ciphers/chacha.js";'
        )
    source.write_text(text)
    done = subprocess.run(
        [node, "scripts/bundle.mjs", "--only", "conformance-client"],
        cwd=web,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return web


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_a_typescript_client_without_a_check_fails_the_scenarios_that_need_it(
    node: str, variant: str, tmp_path: Path
) -> None:
    web = _broken_copy(node, variant, tmp_path)
    report = run_client_conformance(_command(node, web), scenarios=SCENARIOS, timeout=30)
    failed = {r.scenario for r in report.results if r.verdict == "fail"}
    assert failed == BROKEN[variant], [
        (r.scenario, r.verdict, r.reason, r.output[-300:]) for r in report.results
    ]
    for result in report.results:
        if result.scenario in failed:
            assert result.exit_code == 0 and "accepted what it must refuse" in result.reason
            assert any(" -> " in line for line in result.log)  # what the scripted server sent
