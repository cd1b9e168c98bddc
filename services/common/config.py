"""The one config style: command-line flags, each with an environment-variable fallback
(``HAOPING_<FLAG>``), so docker compose can configure a service without a command line."""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing


def env_name(flag: str) -> str:
    return "HAOPING_" + flag.lstrip("-").replace("-", "_").upper()


def add_flag(parser: argparse.ArgumentParser, flag: str, default=None, type=str, help: str = "", **kwargs):
    """``--flag`` whose default comes from $HAOPING_FLAG when set."""
    env = env_name(flag)
    if env in os.environ:
        raw = os.environ[env]
        default = (raw.lower() in ("1", "true", "yes", "on")) if type is bool else type(raw)
    if type is bool:
        parser.add_argument(flag, default=bool(default), action=argparse.BooleanOptionalAction,
                            help=f"{help} (env {env})", **kwargs)
    else:
        parser.add_argument(flag, default=default, type=type, help=f"{help} (env {env}; default %(default)s)",
                            **kwargs)


def add_common_server_flags(parser: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    add_flag(parser, "--host", "127.0.0.1", help="address to listen on")
    add_flag(parser, "--port", port, int, "gRPC port (0 picks a free one)")
    add_flag(parser, "--metrics-port", metrics_port, int, "Prometheus /metrics port (0 picks a free one)")
    add_flag(parser, "--device", "auto", help="torch device: auto, cpu, cuda, cuda:1")
    add_flag(parser, "--dtype", "float32", help="float32, bfloat16 or float16")
    add_flag(parser, "--grace-seconds", 10.0, float, "how long SIGTERM waits for in-flight requests")
    add_flag(parser, "--drain-announce-seconds", 1.0, float, "after SIGTERM, report NOT_SERVING this long before closing")
    add_flag(parser, "--max-message-mb", 64, int, "largest gRPC message, send and receive")
    add_flag(parser, "--threads", 0, int, "torch threads (0: torch's default)")
    add_flag(parser, "--deterministic", True, bool,
             "deterministic torch kernels: the same request gives the same bits in every process, so a "
             "run is reproducible from its seed and a replayed cycle repeats the original (on CPU free; "
             "on CUDA it can cost speed)")
    add_flag(parser, "--rpc-threads", 0, int,
             "gRPC worker threads, one per in-flight call (0: --max-queue + 8, so the queue bound, "
             "not the thread pool, decides when callers get RESOURCE_EXHAUSTED)")
    add_flag(parser, "--ready-file", "", help="write 'host:port metrics_port' here once serving")
    add_security_flags(parser)


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--auth-token-file", "",
             help="file holding the token callers send as 'authorization: Bearer <token>'; without one the "
                  "state-changing and weight RPCs are refused (PERMISSION_DENIED)")
    add_flag(parser, "--require-token-for-reads", False, bool,
             help="also require the token for Generate, GenerateStream, Score and GetInfo (health and "
                  "reflection stay open)")
    add_flag(parser, "--insecure-no-auth", False, bool,
             help="serve every RPC without a token (only on a host and network you trust)")
    add_flag(parser, "--tls-cert", "", help="PEM certificate chain: serve TLS (with --tls-key)")
    add_flag(parser, "--tls-key", "", help="PEM private key of --tls-cert")
    add_flag(parser, "--tls-ca", "", help="PEM CA bundle: require client certificates signed by it (mutual TLS); "
                                          "also trusted when this service dials its peers")


def add_batching_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--max-batch-size", 256, int, "most items merged into one model batch")
    add_flag(parser, "--max-wait-ms", 5.0, float, "how long an idle batcher waits for requests already on their way to batch with")
    add_flag(parser, "--max-queue", 256, int, "requests waiting beyond this get RESOURCE_EXHAUSTED")
    add_flag(parser, "--gil-switch-ms", 1.0, float,
             "Python's thread switch interval (sys.setswitchinterval; Python's default is 5): lower "
             "lets the batcher thread get the GIL back sooner from many request-handler threads")


def _optional(kind):
    """A flag type that also takes ``none`` (for ``X | None`` fields)."""
    def parse(raw: str):
        return None if raw.lower() in ("none", "null", "") else kind(raw)
    parse.__name__ = kind.__name__
    return parse


def _field_kind(hint):
    """(base type, optional?) of a dataclass field's type hint: int, float, str, bool, or X | None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and len(args) < len(typing.get_args(hint)):
        return args[0], True
    return hint, False


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                        group_title: str = "") -> list[str]:
    """A typed ``--field-name`` for every field of dataclass ``cls`` (help and choices from the
    field's metadata, default from the dataclass, $HAOPING_FIELD_NAME fallback). A flag not given
    is absent from the parsed namespace, so a caller can tell it from one given with the default
    value (see :func:`dataclass_flag_values`). Returns the field names added."""
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(group_title) if group_title else parser
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        env = env_name(flag)
        kind, optional = _field_kind(hints[f.name])
        choices = f.metadata.get("choices")
        default_text = "none" if f.default is None else str(f.default).lower() if kind is bool else str(f.default)
        help_text = f"{f.metadata.get('help', '')} (default {default_text}; env {env})".replace("%", "%%")
        if kind is bool:
            default = (os.environ[env].lower() in ("1", "true", "yes", "on")) if env in os.environ \
                else argparse.SUPPRESS
            target.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parse = _optional(kind) if optional else kind
            default = parse(os.environ[env]) if env in os.environ else argparse.SUPPRESS
            target.add_argument(flag, dest=f.name, default=default, type=parse, choices=choices,
                                metavar="{" + ",".join(choices) + "}" if choices else kind.__name__.upper(),
                                help=help_text)
        added.append(f.name)
    return added


def dataclass_flag_values(args: argparse.Namespace, names: list[str]) -> dict:
    """The fields whose flags were given (on the command line or through the environment)."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def add_client_access_flags(parser: argparse.ArgumentParser, token_help: str = "") -> None:
    """How a command reaches running services: their token file and TLS files."""
    add_flag(parser, "--auth-token-file", "",
             help=token_help or "file holding the services' token (sent as 'authorization: Bearer <token>')")
    add_flag(parser, "--tls-ca", "", help="services over TLS: the CA that signed their certificates")
    add_flag(parser, "--tls-cert", "", help="services with mutual TLS: this client's certificate")
    add_flag(parser, "--tls-key", "", help="services with mutual TLS: this client's key")
