"""runtime.config: ServerConfig validation and the dataclass -> argparse flags round trip."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from engine.config import EngineConfig
from runtime.config import ConfigError, ServerConfig, add_config_arguments, config_from_arguments


def parse(argv: list[str]) -> tuple[ServerConfig, EngineConfig]:
    parser = argparse.ArgumentParser(prog="test", exit_on_error=False)
    add_config_arguments(parser, ServerConfig)
    add_config_arguments(parser, EngineConfig, prefix="engine")
    args = parser.parse_args(argv)
    return config_from_arguments(ServerConfig, args), config_from_arguments(EngineConfig, args, prefix="engine")


def test_flags_build_both_configs_and_keep_defaults():
    server, engine = parse(["--checkpoint", "ckpt", "--port", "0", "--token", "s3cret", "--metrics-port", "9100",
                            "--state-ttl", "2.5", "--engine-num-kv-blocks", "128", "--no-engine-enable-prefix-caching",
                            "--engine-device", "cpu"])
    assert server == ServerConfig(checkpoint="ckpt", port=0, token="s3cret", metrics_port=9100, state_ttl=2.5)
    assert server.host == "127.0.0.1"  # localhost unless told otherwise
    assert engine == EngineConfig(num_kv_blocks=128, enable_prefix_caching=False)


def test_defaults_only():
    server, engine = parse(["--checkpoint", "c"])
    assert server == ServerConfig(checkpoint="c") and engine == EngineConfig()
    assert (server.port, server.token, server.tls, server.metrics_port) == (50051, None, False, None)


def test_checkpoint_is_required(capsys):
    parser = argparse.ArgumentParser(prog="test")
    add_config_arguments(parser, ServerConfig)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "test: error: the following arguments are required: --checkpoint" in capsys.readouterr().err


def test_tuple_and_optional_fields():
    @dataclass(frozen=True)
    class Example:
        sizes: tuple[int, ...] = (1, 2)
        name: str | None = None
        flag: bool = False

    parser = argparse.ArgumentParser(prog="test")
    add_config_arguments(parser, Example, prefix="x")
    assert config_from_arguments(Example, parser.parse_args(["--x-sizes", "3", "4", "5", "--x-flag"]), "x") == Example(
        sizes=(3, 4, 5), flag=True)
    assert config_from_arguments(Example, parser.parse_args([]), prefix="x") == Example()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"port": 70000}, "port must lie in [0, 65535], got 70000"),
    ({"tls_cert": "cert.pem"}, "tls_cert and tls_key must be given together"),
    ({"token": "two words"}, "token must be non-empty and contain no whitespace"),
    ({"state_ttl": 0.0}, "state_ttl must be a finite number of seconds > 0, got 0.0"),
    ({"max_states_per_client": 0}, "max_states_per_client must be > 0, got 0"),
    ({"checkpoint": ""}, "checkpoint must be a directory path"),
])
def test_invalid_server_config(kwargs, message):
    with pytest.raises(ConfigError) as info:
        ServerConfig(**{"checkpoint": "c", **kwargs})
    assert str(info.value) == f"invalid server config: {message}"


def test_unreadable_tls_file_is_named(tmp_path):
    (tmp_path / "key.pem").write_text("KEY")
    config = ServerConfig(checkpoint="c", tls_cert=str(tmp_path / "missing.pem"), tls_key=str(tmp_path / "key.pem"))
    with pytest.raises(ConfigError, match=r"tls_cert: cannot read .*missing\.pem \(No such file or directory\)"):
        config.read_tls_pair()
