"""cnn-serve's settings: every default once, a flag beats its CONVSERVE_* variable, and what
was accepted before the settings were typed is accepted still."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.options import SettingsError, env_name
from serving.settings import ServerSettings, server_settings


def test_a_flag_beats_its_variable_and_the_variable_beats_the_default():
    env = {"CONVSERVE_MAX_BATCH_SIZE": "32", "CONVSERVE_PORT": "7000"}
    s = server_settings(["--port", "7001"], environ=env)
    assert (s.port, s.max_batch_size, s.max_queue_size) == (7001, 32, 4096)
    assert s.batching.max_batch_size == 32 and s.repository.root == Path("models")


def test_every_flag_has_its_variable_named_in_the_help(capsys):
    with pytest.raises(SystemExit):
        server_settings(["--help"], environ={})
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("model-repository", "max-batch-size", "tls-cert", "health-port", "model"):
        assert f"[{env_name(flag)}]" in help_text


def test_a_blank_path_variable_or_flag_means_off():
    env = {"CONVSERVE_AUTH_TOKEN_FILE": "", "CONVSERVE_TLS_CERT": "", "CONVSERVE_TLS_KEY": ""}
    s = server_settings(["--tls-client-ca", ""], environ=env)
    assert (s.auth_token_file, s.tls_cert, s.tls_key, s.tls_client_ca) == (None,) * 4
    assert s.tls_files is None


def test_log_levels_are_read_in_any_case():
    assert server_settings(["--log-level", "INFO"], environ={}).log_level == "info"
    assert server_settings([], environ={"CONVSERVE_LOG_LEVEL": "WARN"}).log_level == "warn"


def test_a_bad_value_exits_naming_the_flag_or_the_variable(capsys):
    for argv, env, says in (
        (["--port", "-1"], {}, "--port must be >= 0"),
        (["--tls-cert", "c.pem"], {}, "--tls-cert and --tls-key go together"),
        ([], {"CONVSERVE_MAX_BATCH_SIZE": "many"}, "CONVSERVE_MAX_BATCH_SIZE='many'"),
        (["--device", "gpu"], {}, "--device"),
        (["--model", "fm:one"], {}, "versions are numbers"),
    ):
        with pytest.raises(SystemExit) as exited:
            server_settings(argv, environ=env)
        assert exited.value.code == 2
        assert says in capsys.readouterr().err


def test_settings_built_in_code_are_held_to_the_same_rules():
    s = ServerSettings(model_repository="models", tls_cert="", tls_key="")
    assert s.model_repository == Path("models") and s.tls_cert is None
    with pytest.raises(SettingsError, match="--max-batch-size must be >= 1"):
        ServerSettings(max_batch_size=0)
