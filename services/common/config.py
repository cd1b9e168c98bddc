"""The one config style: command-line flags, each with an environment-variable fallback
(``HAOPING_<FLAG>``), so docker compose can configure a service without a command line."""
from __future__ import annotations

import argparse
import os


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


def add_client_access_flags(parser: argparse.ArgumentParser, token_help: str = "") -> None:
    """How a command reaches running services: their token file and TLS files."""
    add_flag(parser, "--auth-token-file", "",
             help=token_help or "file holding the services' token (sent as 'authorization: Bearer <token>')")
    add_flag(parser, "--tls-ca", "", help="services over TLS: the CA that signed their certificates")
    add_flag(parser, "--tls-cert", "", help="services with mutual TLS: this client's certificate")
    add_flag(parser, "--tls-key", "", help="services with mutual TLS: this client's key")
