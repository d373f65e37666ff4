"""Issue 16 items 3 and 4 from the keymgmt CLI (a subprocess against a real key-server process
over loopback TLS 1.3): labels in place of key ids, rename, list with labels (and a tampered
one), audit --verify and --head, the JSON export's hashes, and the one-line failures."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct

from tests.support.cli import run_client


def _server_db(server) -> sqlite3.Connection:
    (path,) = list(server.directory.glob("*.db"))
    return sqlite3.connect(path, isolation_level=None)


def _one_line_error(result, code: int, words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stderr.startswith("keymgmt: error:") and words in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_labels_from_the_command_line(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    generated = run_client(server, tmp_path, "generate", "--label", "backup key")
    assert generated.returncode == 0, generated.stderr
    key_id = generated.stdout.strip()
    imported = run_client(server, tmp_path, "import", "--hex", "68656c6c6f", "--label", "greeting", "--json")
    imported_id = json.loads(imported.stdout)["key_id"]
    assert json.loads(imported.stdout)["label"] == "greeting"

    # every command that takes a key id takes its label
    assert run_client(server, tmp_path, "export", "greeting").stdout.strip() == "0568656c6c6f"
    assert (
        run_client(server, tmp_path, "retrieve", "greeting", "--no-local-store").stdout.strip()
        == "68656c6c6f"
    )
    table = run_client(server, tmp_path, "list").stdout
    assert "backup key" in table and "greeting" in table and "label" in table.splitlines()[0]
    renamed = run_client(server, tmp_path, "rename", "backup key", "main")
    assert renamed.returncode == 0 and renamed.stdout.strip() == f"labelled {key_id} 'main'"
    listed = {
        k["key_id"]: (k["label"], k["label_status"])
        for k in json.loads(run_client(server, tmp_path, "list", "--json").stdout)
    }
    assert listed == {key_id: ("main", "ok"), imported_id: ("greeting", "ok")}
    keyed = json.loads(run_client(server, tmp_path, "audit", "--json", "--key", "main").stdout)
    assert keyed["entries"] and {e["key_id"] for e in keyed["entries"]} == {key_id}

    # the server never sees a label
    db = _server_db(server)
    labels = [row[0] for row in db.execute("SELECT label FROM key_labels")]
    assert len(labels) == 2
    assert all(b"main" not in label and b"greeting" not in label for label in labels)

    # unknown, taken and invalid labels: one line each, the README's exit codes
    _one_line_error(run_client(server, tmp_path, "retrieve", "nope"), 4, "no key is labelled 'nope'")
    _one_line_error(run_client(server, tmp_path, "rename", "main", "greeting"), 1, "already labelled")
    _one_line_error(run_client(server, tmp_path, "generate", "--label", "x" * 65), 2, "1..64 bytes")
    _one_line_error(run_client(server, tmp_path, "rename", "main"), 2, "LABEL, or --remove")
    _one_line_error(run_client(server, tmp_path, "delete", "--yes", "a\tb"), 2, "control characters")

    removed = run_client(server, tmp_path, "rename", "--remove", "main")
    assert removed.returncode == 0 and removed.stdout.strip() == f"removed the label of {key_id}"
    # review of issue 16, gap 6: a key without a label is said to have none
    again = run_client(server, tmp_path, "rename", "--remove", key_id)
    assert again.returncode == 0 and again.stdout.strip() == f"{key_id} has no label; nothing removed"
    again = json.loads(run_client(server, tmp_path, "rename", "--remove", key_id, "--json").stdout)
    assert again == {"key_id": key_id, "label": None, "removed": False}
    assert run_client(server, tmp_path, "delete", "--yes", "greeting").returncode == 0
    assert [k["label"] for k in json.loads(run_client(server, tmp_path, "list", "--json").stdout)] == [None]

    # a tampered label: shown, warned about, and it names nothing
    run_client(server, tmp_path, "rename", key_id, "tamper me")
    sealed = db.execute("SELECT label FROM key_labels WHERE key_id = ?", (bytes.fromhex(key_id),)).fetchone()[
        0
    ]
    db.execute(
        "UPDATE key_labels SET label = ? WHERE label = ?", (sealed[:-1] + bytes([sealed[-1] ^ 1]), sealed)
    )
    listing = run_client(server, tmp_path, "list")
    assert "<tampered>" in listing.stdout and "failed verification" in listing.stderr
    _one_line_error(run_client(server, tmp_path, "export", "tamper me"), 4, "no key is labelled")


def test_list_shows_a_label_of_the_wrong_length_as_tampered(server, tmp_path):
    """Review of issue 16, gap 3: a stored label of a length no sealed label has broke `list`
    (the key server answered INTERNAL)."""
    assert run_client(server, tmp_path, "register").returncode == 0
    key_id = run_client(server, tmp_path, "generate", "--label", "fine").stdout.strip()
    other = run_client(server, tmp_path, "generate", "--label", "to be cut").stdout.strip()
    db = _server_db(server)
    db.execute("UPDATE secrets SET label = ? WHERE key_id = ?", (b"cut", bytes.fromhex(other)))
    listing = run_client(server, tmp_path, "list")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split()[-1] for line in listing.stdout.splitlines()[1:]}
    assert rows == {key_id: "fine", other: "<tampered>"}
    assert "1 label(s) failed verification" in listing.stderr and "error" not in listing.stderr
    assert run_client(server, tmp_path, "export", "fine").returncode == 0


def test_audit_verify_head_and_a_tampered_log(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    key_id = run_client(server, tmp_path, "generate").stdout.strip()
    verified = run_client(server, tmp_path, "audit", "--verify", "--json")
    assert verified.returncode == 0, verified.stderr
    assert "audit log verified: entries 1.." in verified.stderr
    document = json.loads(verified.stdout)
    assert document["format"] == "keymgmt-audit-v3"
    entries = document["entries"]
    assert [e["entry_id"] for e in entries] == list(range(1, len(entries) + 1))

    # a third party checks the export from its fields alone (docs/protocol.md section 12.9)
    previous = bytes(32)
    actions = {"register": 1, "login": 2, "logout": 3, "retrieve_storage_key": 4, "create_key_id": 5,
               "generate": 6, "audit": 11}  # fmt: skip
    for e in entries:
        encoded = struct.pack(">QBQBI", e["entry_id"], actions[e["action"]], e["timestamp_us"],
                              0 if e["outcome"] == "success" else 1, e["count"])  # fmt: skip
        encoded += b"\x00" if e["key_id"] is None else b"\x01" + bytes.fromhex(e["key_id"])
        encoded += b"\xff"  # no context in these entries
        domain = b"keymgmt v1 audit chain"
        previous = hashlib.sha3_256(
            struct.pack(">H", len(domain)) + domain + bytes.fromhex(e["actor"]) + previous + encoded
        ).digest()
        assert e["hash"] == previous.hex()
    filtered = json.loads(run_client(server, tmp_path, "audit", "--verify", "--json", "--key", key_id).stdout)
    assert filtered["entries"] and {e["key_id"] for e in filtered["entries"]} == {key_id}

    head = run_client(server, tmp_path, "audit", "--head")
    position, digest = head.stdout.split()
    assert head.returncode == 0 and int(position) > len(entries) and len(digest) == 64
    head_json = json.loads(run_client(server, tmp_path, "audit", "--head", "--json").stdout)
    assert head_json["position"] > int(position)

    # change one entry the client verified: refused, one line, exit 1
    db = _server_db(server)
    db.execute("UPDATE audit SET timestamp_us = timestamp_us + 1 WHERE seq = 2")
    _one_line_error(run_client(server, tmp_path, "audit", "--verify"), 1, "entry 2 does not match")
    # without --verify the entries are shown as the server sends them (nothing checked)
    assert run_client(server, tmp_path, "audit").returncode == 0
