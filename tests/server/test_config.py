"""keymgmt-server configuration: TOML, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from keymgmt.adapters.server.config import OPTIONS, ConfigError, load_settings, render_config

from ..support.net_world import running_server


def test_defaults_file_and_environment_layer_in_that_order(tmp_path):
    config = tmp_path / "conf" / "server.toml"
    config.parent.mkdir()
    config.write_text(render_config({"server.port": 9000, "server.storage": "data/ks.db"}))
    settings = load_settings(config, env={})
    assert settings.port == 9000
    assert settings.storage_path == config.parent / "data" / "ks.db"  # relative to the file
    assert settings.protocol.idle_timeout == 300.0
    settings = load_settings(config, env={"KEYMGMT_PORT": "9100", "KEYMGMT_IDLE_TIMEOUT": "12.5"})
    assert settings.port == 9100 and settings.protocol.idle_timeout == 12.5
    hot = load_settings(None, env={"KEYMGMT_MAX_HOT_SESSIONS": "7"}).protocol.max_hot_channels
    assert hot == 7
    admission = load_settings(
        None,
        env={
            "KEYMGMT_ADMISSION_RATE": "2.5",
            "KEYMGMT_MAX_CONNECTIONS_PER_ADDRESS": "3",
            "KEYMGMT_FRAME_TIMEOUT": "4",
            "KEYMGMT_CONNECTION_IDLE_TIMEOUT": "6",
            "KEYMGMT_UNPRODUCTIVE_BURST": "300",
            "KEYMGMT_UNPRODUCTIVE_RATE": "8.5",
            "KEYMGMT_SEND_TIMEOUT": "2.5",
        },
    )
    assert admission.send_timeout == 2.5 and load_settings(None, env={}).send_timeout == 30.0
    # issue 16: how often sessions are checked against their account's credentials (0: off)
    assert load_settings(None, env={}).credentials_check == 5.0
    assert load_settings(None, env={"KEYMGMT_CREDENTIALS_CHECK": "0"}).credentials_check == 0.0
    assert (admission.admission_rate, admission.max_connections_per_address) == (2.5, 3)
    assert (admission.protocol.frame_timeout, admission.protocol.connection_idle_timeout) == (4, 6)
    assert (admission.protocol.unproductive_burst, admission.protocol.unproductive_rate) == (300, 8.5)
    defaults = load_settings(None, env={}).protocol
    assert (defaults.unproductive_burst, defaults.unproductive_rate) == (1024, 64.0)
    assert load_settings(None, env={}).port == 7443


def test_every_option_is_rendered_and_parsed(tmp_path):
    config = tmp_path / "all.toml"
    config.write_text(render_config({}))
    text = config.read_text()
    for option in OPTIONS:
        assert f"{option.key} = " in text
    load_settings(config, env={})


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("[server]\nport = 'x'\n", {}, "server.port must be a non-negative integer"),
        ("[server]\nport = 70000\n", {}, "at most 65535"),
        ("[server]\nprot = 1\n", {}, "unknown option server.prot"),
        ("[sessions]\nidle_timeout = 0\n", {}, "idle_timeout must be positive"),
        ("[sessions]\nmax_hot = 0\n", {}, "max_hot_channels must be at least 1"),
        ("[server]\nunproductive_burst = 0\n", {}, "unproductive_burst must be at least 1"),
        ("", {"KEYMGMT_UNPRODUCTIVE_RATE": "0"}, "unproductive_rate must be positive"),
        ("[server\n", {}, "not valid TOML"),
        ("", {"KEYMGMT_MAX_CONNECTIONS": "-3"}, "$KEYMGMT_MAX_CONNECTIONS"),
        ("server = 3\n", {}, "must be a table"),
        ("[admission]\nrate = 0\n", {}, "admission.rate must be positive"),
        ("[admission]\nrate = nan\n", {}, "admission.rate must be a finite non-negative number"),
        ("", {"KEYMGMT_CONNECTION_IDLE_TIMEOUT": "inf"}, "must be a finite non-negative number"),
        ("", {"KEYMGMT_ADMISSION_BURST": "nan"}, "must be a finite non-negative number"),
        ("", {"KEYMGMT_ADMISSION_BURST": "0.5"}, "admission.burst must be at least 1"),
        ("[server]\nmax_connections_per_address = 0\n", {}, "at least 1"),
        ("[server]\nconnection_idle_timeout = 0\n", {}, "connection_idle_timeout must be positive"),
        ("", {"KEYMGMT_SEND_TIMEOUT": "0"}, "server.send_timeout must be positive"),
        ("", {"KEYMGMT_CREDENTIALS_CHECK": "-1"}, "sessions.credentials_check must be a finite non-negative"),
        ("[requests]\nper_user_rate = 0\n", {}, "requests.per_user_rate must be positive"),
        ("", {"KEYMGMT_REQUESTS_PER_USER_BURST": "0.5"}, "requests.per_user_burst must be at least 1"),
        ("", {"KEYMGMT_REQUESTS_PER_USER_RATE": "inf"}, "must be a finite non-negative number"),
    ],
)
def test_bad_configuration_is_a_clear_error(tmp_path, content, env, message):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_settings(config, env=env)
    assert message in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


@pytest.mark.anyio
async def test_tls_handshake_timeout_drops_silent_connections(tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="keymgmt.server")
    async with running_server(tmp_path, tls_handshake_timeout=0.2) as (runtime, _pki):
        silent = await anyio.connect_tcp("127.0.0.1", runtime.port)
        with anyio.fail_after(5):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await silent.receive()
        await silent.aclose()
    assert any("timed out" in r.getMessage() for r in caplog.records)


def test_readme_lists_every_option():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for option in OPTIONS:
        assert f"`{option.section}." in readme and option.env.rsplit("_", 1)[-1] in readme, option.key


def test_a_max_payload_no_login_fits_in_is_a_config_error():
    """1 byte started a server that failed every connection (review 15, finding 6)."""
    for too_small in ("1", "1023"):
        with pytest.raises(ConfigError, match=r"sessions\.max_payload must be at least 1024 bytes"):
            load_settings(None, env={"KEYMGMT_MAX_PAYLOAD": too_small})
    assert load_settings(None, env={"KEYMGMT_MAX_PAYLOAD": "1024"}).protocol.max_payload == 1024


def test_websocket_settings_from_the_file_and_the_environment(tmp_path):
    """Off by default; the listener's host defaults to server.host; origins are normalized
    as browsers send them (lower case, no default port)."""
    assert load_settings(None, env={}).websocket_listen is None
    config = tmp_path / "server.toml"
    text = render_config({"server.host": "0.0.0.0", "websocket.listen": "7444"})
    text = text.replace(
        "allowed_origins = []", 'allowed_origins = ["HTTPS://App.Example.org:443", "http://localhost:8080"]'
    )
    config.write_text(text)
    settings = load_settings(config, env={})
    assert settings.websocket_listen == ("0.0.0.0", 7444)
    assert settings.websocket_origins == {"https://app.example.org", "http://localhost:8080"}
    assert settings.websocket_upgrade_timeout == 10.0
    settings = load_settings(
        config,
        env={
            "KEYMGMT_WEBSOCKET_LISTEN": "127.0.0.1:0",
            "KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS": "https://a.example, https://b.example:8443",
            "KEYMGMT_WEBSOCKET_UPGRADE_TIMEOUT": "2.5",
        },
    )
    assert settings.websocket_listen == ("127.0.0.1", 0)
    assert settings.websocket_origins == {"https://a.example", "https://b.example:8443"}
    assert settings.websocket_upgrade_timeout == 2.5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"KEYMGMT_WEBSOCKET_LISTEN": "7444"},
            r"websocket\.listen is set but websocket\.allowed_origins is empty",
        ),
        ({"KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS": "*"}, r"websocket\.allowed_origins: '\*' is not an origin"),
        ({"KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS": "null"}, r"'null' is not an origin"),
        (
            {"KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS": "https://a.example/app"},
            r"'https://a.example/app' is not an",
        ),
        ({"KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS": "ftp://a.example"}, r"is not an origin"),
        ({"KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS": "https://a.example:0"}, r"port 0 is not in 1\.\.65535"),
        ({"KEYMGMT_WEBSOCKET_LISTEN": "a:b:c"}, r"websocket\.listen: 'a:b:c' is not PORT"),
        ({"KEYMGMT_WEBSOCKET_UPGRADE_TIMEOUT": "0"}, r"websocket\.upgrade_timeout must be positive"),
    ],
)
def test_bad_websocket_settings_are_one_line_errors(env, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_settings(None, env=env)
    assert "\n" not in str(error.value)


def test_a_websocket_port_that_is_the_tls_or_a_health_port_is_refused():
    from keymgmt.adapters.cli.server import check_ports

    origins = {"KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS": "https://a.example"}
    same = load_settings(None, env={**origins, "KEYMGMT_WEBSOCKET_LISTEN": "7443"})
    with pytest.raises(ConfigError, match=r"websocket\.listen's port 7443 is the TLS port"):
        check_ports(same)
    health = load_settings(
        None, env={**origins, "KEYMGMT_WEBSOCKET_LISTEN": "7444", "KEYMGMT_HEALTH_LISTEN": "7444"}
    )
    with pytest.raises(ConfigError, match=r"include the WebSocket port 7444"):
        check_ports(health)
    check_ports(load_settings(None, env={**origins, "KEYMGMT_WEBSOCKET_LISTEN": "7444"}))
