"""`keymgmt passwd` and `keymgmt delete-account` as subprocesses against a real key-server
process over loopback TLS 1.3 (issue 16): at a pty, from stdin and files, and their failures."""

from __future__ import annotations

import json
import sqlite3
import subprocess

from tests.support.cli import CLIENT, client_env, run_client

from .test_cli_interactive import PASSWORD, Terminal

NEW = "a quite different passphrase 2026"


def _local_rows(tmp_path) -> int:
    db = sqlite3.connect(tmp_path / "client" / "local.db")
    try:
        return int(db.execute("SELECT count(*) FROM local_secrets").fetchone()[0])
    finally:
        db.close()


def test_passwd_from_stdin_keeps_the_secrets_and_the_log(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    secret = "68656c6c6f"
    key_id = run_client(server, tmp_path, "import", "--hex", secret).stdout.strip()
    changed = run_client(server, tmp_path, "passwd", password=f"{PASSWORD}\n{NEW}")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.strip() == "changed the password of alice@example.org; its other sessions ended"
    old = run_client(server, tmp_path, "logout")
    assert old.returncode == 3 and old.stderr.count("\n") == 1, old.stderr
    fetched = run_client(server, tmp_path, "retrieve", key_id, "--no-local-store", password=NEW)
    assert fetched.returncode == 0 and fetched.stdout.strip() == secret, fetched.stderr
    document = json.loads(run_client(server, tmp_path, "audit", "--json", password=NEW).stdout)
    actions = [e["action"] for e in document["entries"]]
    assert actions[0] == "register" and "import" in actions  # the log carried over
    assert "change_password_start" in actions and "change_password" in actions
    assert not any(PASSWORD in line or NEW in line for line in server.log)


def test_passwd_with_a_wrong_current_password_changes_nothing(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    wrong = run_client(server, tmp_path, "passwd", password=f"not the password\n{NEW}")
    assert wrong.returncode == 3, wrong.stderr
    assert wrong.stderr.startswith("keymgmt: error:") and wrong.stderr.count("\n") == 1
    assert "Traceback" not in wrong.stderr
    assert run_client(server, tmp_path, "logout").returncode == 0  # the old password still works
    assert run_client(server, tmp_path, "logout", password=NEW).returncode == 3


def test_passwd_checks_its_files_before_connecting(tmp_path):
    same = tmp_path / "pw.txt"
    same.write_text("one password\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    # Port 9 on loopback: nothing listens; each error comes before any connection attempt.
    env = client_env(9, tmp_path / "no-ca.pem", tmp_path)
    cases = [
        (["--new-password-file", str(same)], "the new password is the current one"),
        (["--new-password-file", str(empty)], "the new password is empty"),
        (["--new-password-file", str(tmp_path / "missing")], "cannot read the new password file"),
    ]
    for extra, message in cases:
        result = subprocess.run(
            [*CLIENT, "passwd", "--password-file", str(same), *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 2, (extra, result.stderr)
        assert result.stderr.startswith("keymgmt: error: ") and message in result.stderr
        assert result.stderr.count("\n") == 1


def test_passwd_refuses_the_current_password_from_stdin_before_connecting(server_dir, tmp_path):
    """Review of issue 16, gap 5 (the stdin path; the file path is above): the two lines are
    compared before any connection is made (nothing listens on port 9)."""
    env = client_env(9, server_dir / "ca.pem", tmp_path)
    result = subprocess.run(
        [*CLIENT, "passwd"],
        input=f"{PASSWORD}\n{PASSWORD}\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == "keymgmt: error: the new password is the current one\n"


def test_passwd_at_a_terminal_asks_twice(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    term = Terminal(["passwd"], client_env(server.port, server.directory / "ca.pem", tmp_path))
    term.expect("password: ")
    term.type(PASSWORD)
    term.expect("new password: ")
    term.type(NEW)
    term.expect("new password again: ")
    term.type(NEW)
    code, output = term.finish()
    assert code == 0 and "changed the password of alice@example.org" in output, output
    assert PASSWORD not in output and NEW not in output  # no echo
    assert run_client(server, tmp_path, "logout", password=NEW).returncode == 0


def test_delete_account_with_yes_wipes_the_server_and_the_local_cache(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    assert run_client(server, tmp_path, "generate").returncode == 0
    assert _local_rows(tmp_path) == 1
    deleted = run_client(server, tmp_path, "delete-account", "--yes", "--json")
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout) == {"account": "alice@example.org", "deleted": True}
    assert _local_rows(tmp_path) == 0
    assert run_client(server, tmp_path, "logout").returncode == 3  # as for an unknown name
    again = run_client(server, tmp_path, "register", password=NEW)
    assert again.returncode == 5 and "already registered" in again.stderr  # the name stays reserved


def test_delete_account_needs_yes_without_a_terminal(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    refused = run_client(server, tmp_path, "delete-account")
    assert refused.returncode == 2
    assert refused.stderr == (
        "keymgmt: error: delete-account asks for confirmation: give --yes when stdin is not a terminal\n"
    )
    assert run_client(server, tmp_path, "logout").returncode == 0  # nothing was deleted


def test_delete_account_asks_first_at_a_terminal(server, tmp_path):
    assert run_client(server, tmp_path, "register").returncode == 0
    env = client_env(server.port, server.directory / "ca.pem", tmp_path)
    question = (
        "delete the account alice@example.org with every secret in it and its audit log? "
        "This cannot be undone. [y/N] "
    )
    term = Terminal(["delete-account"], env)
    term.expect(question)
    term.type("")  # the default is no
    code, output = term.finish()
    assert code == 1 and "keymgmt: error: not confirmed; nothing deleted" in output, output
    assert "password:" not in output
    assert run_client(server, tmp_path, "logout").returncode == 0
    term = Terminal(["delete-account"], env)
    term.expect(question)
    term.type("y")
    term.expect("password: ")
    term.type(PASSWORD)
    code, output = term.finish()
    assert code == 0 and "deleted the account alice@example.org" in output, output
    assert run_client(server, tmp_path, "logout").returncode == 3


def test_passwd_and_delete_account_refused_for_an_old_login_say_why_in_one_line(server_dir, tmp_path):
    """Review of issue 16, gap 4: a refused password change or deletion printed only
    'request refused: invalid'. With a reauthentication window shorter than a login takes,
    every login is already too old: the refusal says so, and what to do, in one line."""
    from tests.support.cli import ServerProcess

    server = ServerProcess(server_dir, env={"KEYMGMT_REAUTH_WINDOW": "0.001"})
    try:
        assert run_client(server, tmp_path, "register").returncode == 0
        for args, password in (("passwd",), f"{PASSWORD}\n{NEW}"), (("delete-account", "--yes"), PASSWORD):
            refused = run_client(server, tmp_path, *args, password=password)
            assert refused.returncode == 5, refused.stderr
            assert refused.stderr.startswith("keymgmt: error: request refused: a password change or an")
            assert "needs a recent login" in refused.stderr and refused.stderr.endswith("log in again\n")
            assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert run_client(server, tmp_path, "logout").returncode == 0  # nothing changed
    finally:
        assert server.stop() == 0
