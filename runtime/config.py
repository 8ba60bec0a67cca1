"""The rollout server's configuration, and the one helper that turns frozen config dataclasses into CLI flags.

Library code receives a `ServerConfig`; only `runtime.server.main` builds an argparse parser (from the
dataclass fields and their `help` metadata) and turns the parsed namespace back into configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_PORT = 50051
SERVICE_NAME = "vla_mbpo.v1.WorldModel"


class ConfigError(ValueError):
    """A configuration value that is out of range or inconsistent with another one. Names the field."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ServerConfig:
    """Everything `vla-mbpo serve` needs besides the engine's own configuration."""

    checkpoint: str = field(metadata=_help("checkpoint directory (layout.json, world_model/, tokenizer/)"))
    host: str = field(default="127.0.0.1", metadata=_help("address to bind; localhost unless told otherwise"))
    port: int = field(default=DEFAULT_PORT, metadata=_help("gRPC port; 0 picks a free one"))
    token: str | None = field(default=None, metadata=_help(
        "bearer token every call must carry (`authorization: Bearer T`); unset = no auth"))
    tls_cert: str | None = field(default=None, metadata=_help("PEM certificate chain; needs --tls-key"))
    tls_key: str | None = field(default=None, metadata=_help("PEM private key; needs --tls-cert"))
    metrics_port: int | None = field(default=None, metadata=_help(
        "serve Prometheus metrics on this port (same host); unset = no metrics endpoint, 0 = a free port"))
    state_ttl: float = field(default=600.0, metadata=_help(
        "seconds a state may go untouched before it is released (a crashed client leaks nothing)"))
    max_states_per_client: int = field(default=16384, metadata=_help(
        "live states one client may hold; more is RESOURCE_EXHAUSTED"))
    max_states_per_request: int = field(default=1024, metadata=_help("start states one CreateStates may carry"))
    max_branches_per_request: int = field(default=8192, metadata=_help("branches one Imagine may carry"))
    max_message_mb: int = field(default=256, metadata=_help("largest request or response message, MiB"))
    grace_period: float = field(default=5.0, metadata=_help(
        "on SIGTERM/SIGINT: seconds in-flight calls may finish before they are cancelled"))
    housekeeping_interval: float = field(default=0.5, metadata=_help(
        "seconds between lease-expiry sweeps and throughput samples"))

    def __post_init__(self) -> None:
        problems = []
        if not self.checkpoint:
            problems.append("checkpoint must be a directory path")
        if not self.host:
            problems.append("host must not be empty")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                problems.append(f"{name} must lie in [0, 65535], got {value}")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key must be given together")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            problems.append("token must be non-empty and contain no whitespace")
        for name in ("state_ttl", "grace_period", "housekeeping_interval"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                problems.append(f"{name} must be a finite number of seconds > 0, got {value}")
        for name in ("max_states_per_client", "max_states_per_request", "max_branches_per_request",
                     "max_message_mb"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if problems:
            raise ConfigError("invalid server config: " + "; ".join(problems))

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    def read_tls_pair(self) -> tuple[bytes, bytes]:
        """(private key, certificate chain) PEM bytes; ConfigError naming the file that cannot be read."""
        assert self.tls_cert is not None and self.tls_key is not None
        pair = []
        for name in ("tls_key", "tls_cert"):
            path = Path(getattr(self, name))
            try:
                pair.append(path.read_bytes())
            except OSError as exc:
                raise ConfigError(f"{name}: cannot read {path} ({exc.strerror})") from None
        return pair[0], pair[1]


# ---- dataclass <-> argparse (entry points only) ----------------------------------------------------

Config = TypeVar("Config")
_SCALARS = (int, float, str, bool)


def _flag_type(hint: Any) -> tuple[type, bool, bool] | None:
    """(scalar type, optional, is tuple) for hints the CLI can express; None for anything else."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            return None
        optional, hint, origin = True, args[0], typing.get_origin(args[0])
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS and args[0] is not bool:
            return args[0], optional, True
        return None
    if hint in _SCALARS:
        return hint, optional, False
    return None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                         title: str | None = None) -> None:
    """Adds one `--[prefix-]field-name` flag per CLI-expressible field of the dataclass `cls`.

    Fields without a default become required flags; bools get `--x/--no-x`; tuples take several values.
    Fields whose type the CLI cannot express keep their default and get no flag.
    """
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        spec = _flag_type(hints[f.name])
        if spec is None:
            continue
        scalar, _, is_tuple = spec
        flag = "--" + (f"{prefix}-" if prefix else "") + f.name.replace("_", "-")
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        text = f.metadata.get("help", f"{cls.__name__}.{f.name}")
        kwargs: dict[str, Any] = {"dest": _dest(prefix, f.name), "default": argparse.SUPPRESS}
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = scalar
            kwargs["metavar"] = scalar.__name__.upper()
            if is_tuple:
                kwargs["nargs"] = "+"
        if has_default:
            text += f" (default: {default})"
        else:
            kwargs["required"] = True
        group.add_argument(flag, help=text, **kwargs)


def config_from_arguments(cls: type[Config], namespace: argparse.Namespace, prefix: str = "") -> Config:
    """Builds `cls` from the flags `add_config_arguments` added; unset flags keep the dataclass default."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        dest = _dest(prefix, f.name)
        if hasattr(namespace, dest):
            value = getattr(namespace, dest)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _dest(prefix: str, name: str) -> str:
    return f"{prefix.replace('-', '_')}__{name}" if prefix else name
