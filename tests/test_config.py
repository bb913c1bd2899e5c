"""Configuration: defaults, TOML, environment overrides and clear errors."""

from __future__ import annotations

import pytest

from monitor.config import load_config, parse_config
from monitor.errors import ConfigError


def test_defaults_work_without_file():
    config = load_config(None, environ={})
    assert config.database.url == "sqlite:///poisonwatch.db"
    assert config.incidents.confidence_threshold == 0.9
    assert config.server.host == "127.0.0.1"


def test_toml_file_read(tmp_path):
    path = tmp_path / "poisonwatch.toml"
    path.write_text(
        '[database]\nurl = "sqlite:///x.db"\n[influence]\ntop_k = 20\n'
        '[[models]]\nname = "digits"\nloader = "monitor.demo_model:load"\noptions = { path = "demo" }\n'
    )
    config = load_config(path, environ={})
    assert config.database.url == "sqlite:///x.db"
    assert config.influence.top_k == 20
    assert config.model("digits").options == {"path": "demo"}
    assert config.model("other") is None


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "poisonwatch.toml"
    path.write_text('[server]\nport = 9000\n')
    config = load_config(path, environ={"POISONWATCH_SERVER_PORT": "9100", "POISONWATCH_DATABASE_URL": "sqlite:///y.db"})
    assert config.server.port == 9100
    assert config.database.url == "sqlite:///y.db"


def test_out_of_range_value_named():
    with pytest.raises(ConfigError, match=r"incidents\.confidence_threshold.*found 1\.5"):
        parse_config({"incidents": {"confidence_threshold": 1.5}}, environ={})


def test_unknown_option_named():
    with pytest.raises(ConfigError, match=r"influence\.topk: Extra inputs are not permitted"):
        parse_config({"influence": {"topk": 5}}, environ={})


def test_bad_environment_value_named():
    with pytest.raises(ConfigError, match=r"server\.port"):
        parse_config({}, environ={"POISONWATCH_SERVER_PORT": "eighty"})


def test_repeated_model_names_rejected():
    models = [{"name": "a", "loader": "x:y"}, {"name": "a", "loader": "x:z"}]
    with pytest.raises(ConfigError, match="repeated: a"):
        parse_config({"models": models}, environ={})


def test_missing_file_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", environ={})


def test_invalid_toml_reported(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[database\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})
