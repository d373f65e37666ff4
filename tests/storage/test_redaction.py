"""Database passwords never reach the key server's output, whichever form the connection
string takes (issue #11: a URL-form database_url was printed with its password)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from keymgmt.adapters.redaction import redact_database_url

SECRET = "s3cr3t-Pa55"

CASES = [
    f"postgresql://alice:{SECRET}@db.internal:5432/keymgmt?sslmode=require",
    f"postgres://alice:{SECRET}@@db/keymgmt",  # an unencoded @ in the password
    f"postgresql://db/keymgmt?user=alice&password={SECRET}&sslmode=verify-full",
    f"host=db password={SECRET} user=alice",
    f"host=db password = '{SECRET} with spaces' user=alice",
    f"host=db password='{SECRET}\\'s' user=alice",
    f'host=db password="{SECRET}" user=alice',
    f"host=db sslpassword={SECRET} dbname=x",
    f"PASSWORD={SECRET} host=x",
    f"postgresql://u:Zx9/{SECRET}@db/keymgmt",  # an unencoded / (or ? or #) in the password
    f"postgresql://u:a?b#{SECRET}@db:5432/keymgmt",
    f"host=db password=Zx9\\ {SECRET} user=x",  # libpq's backslash escape in a bare value
    f"postgresql://db/x?password=s#{SECRET}&user=u",
    f"error: connection to postgresql://u:{SECRET}@127.0.0.1:1/x failed",
]


@pytest.mark.parametrize("text", CASES)
def test_every_form_of_password_is_redacted(text):
    redacted = redact_database_url(text)
    assert SECRET not in redacted
    assert "***" in redacted


def test_what_is_not_a_password_stays():
    for text in [
        "postgresql://alice@db/keymgmt?sslmode=require",
        "postgresql://db.internal:5432/keymgmt",
        "host=db user=alice dbname=keymgmt",
        "host=db xpassword=notakey",
    ]:
        assert redact_database_url(text) == text
    assert redact_database_url(f"host=db password={SECRET} user=alice") == "host=db password=*** user=alice"


@pytest.mark.parametrize("conninfo", [CASES[0], CASES[4], CASES[10], CASES[12]])
def test_an_unreachable_database_is_reported_without_its_password(conninfo):
    from keymgmt.adapters.storage.base import StorageError
    from keymgmt.adapters.storage.postgres import PostgresStorage

    conninfo = conninfo.replace("db.internal:5432", "127.0.0.1:1").replace("host=db", "host=127.0.0.1 port=1")
    with pytest.raises(StorageError) as error:
        PostgresStorage(conninfo, open_timeout=0.5)
    assert "cannot use PostgreSQL" in str(error.value)
    assert SECRET not in str(error.value)
    assert SECRET not in repr(error.value)


def test_keymgmt_server_prints_an_unreachable_url_without_its_password(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "keymgmt.adapters.cli.server", "init", "--dir", str(tmp_path), "--port", "0"],
        capture_output=True,
        check=True,
    )
    env = {**os.environ, "KEYMGMT_DATABASE_URL": f"postgresql://keymgmt:{SECRET}@127.0.0.1:1/keymgmt"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keymgmt.adapters.cli.server",
            "serve",
            "--config",
            str(tmp_path / "keymgmt-server.toml"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot use PostgreSQL (postgresql://keymgmt:***@127.0.0.1:1/keymgmt)" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 1
