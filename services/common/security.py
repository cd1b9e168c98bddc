"""Who may call a service and over what: the token file, TLS server credentials, and the
per-run token files ``haoping run`` writes. The checks themselves are interceptors
(:mod:`services.common.interceptors`)."""
from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

from haoping.atomic import atomic_write_bytes
from haoping.client import TLSFiles, read_token_file
from haoping.log import get_logger

log = get_logger(__name__)


class SecurityConfigError(ValueError):
    """Flags that cannot serve safely (a message for the operator; the service exits 2)."""


@dataclass(frozen=True)
class ServerSecurity:
    token: str | None
    require_token_for_reads: bool
    insecure_no_auth: bool
    credentials: grpc.ServerCredentials | None  # None: plaintext
    client_tls: TLSFiles | None                 # how this service dials its peers (the generator its trainer)

    @classmethod
    def from_args(cls, args) -> "ServerSecurity":
        token = None
        if args.auth_token_file:
            if args.insecure_no_auth:
                raise SecurityConfigError("--auth-token-file and --insecure-no-auth contradict each other")
            try:
                token = read_token_file(args.auth_token_file)
            except (OSError, ValueError) as err:
                raise SecurityConfigError(f"--auth-token-file: {err}") from None
            mode = os.stat(args.auth_token_file).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("token file %s is readable by other users (mode %o); chmod 600 it",
                            args.auth_token_file, stat.S_IMODE(mode))
        elif args.require_token_for_reads and not args.insecure_no_auth:
            raise SecurityConfigError("--require-token-for-reads needs --auth-token-file")
        return cls(token, args.require_token_for_reads, args.insecure_no_auth, server_credentials(args),
                   client_tls(args))

    def describe(self) -> str:
        auth = ("open (--insecure-no-auth)" if self.insecure_no_auth else
                "token required for every RPC but health and reflection" if self.require_token_for_reads else
                "token required for state-changing and weight RPCs" if self.token else
                "no token file: state-changing and weight RPCs refused")
        tls = "plaintext" if self.credentials is None else "TLS"
        return f"{auth}; {tls}"


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SecurityConfigError(f"{flag}: {err}") from None


def server_credentials(args) -> grpc.ServerCredentials | None:
    """TLS with --tls-cert/--tls-key; clients must present a certificate signed by --tls-ca when given."""
    if not (args.tls_cert or args.tls_key):
        if args.tls_ca:
            raise SecurityConfigError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        raise SecurityConfigError("--tls-cert and --tls-key go together")
    pair = (_read("--tls-key", args.tls_key), _read("--tls-cert", args.tls_cert))
    ca = _read("--tls-ca", args.tls_ca) if args.tls_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def client_tls(args) -> TLSFiles | None:
    """A TLS service dials its peers over TLS too: trusting --tls-ca, presenting its own certificate."""
    if not args.tls_cert:
        return None
    return TLSFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def add_listening_port(server: grpc.Server, address: str, security: ServerSecurity) -> int:
    if security.credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, security.credentials)


def write_token_file(path: str | Path) -> Path:
    """A fresh random token in ``path``, mode 0600 from its first byte."""
    return atomic_write_bytes(path, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)


def check_security_flags(parser, args) -> None:
    """Exit 2 with the parser's usage when the access flags cannot serve safely, before a
    service spends time loading its model."""
    try:
        ServerSecurity.from_args(args)
    except SecurityConfigError as err:
        parser.error(str(err))


def client_access(args) -> dict:
    """Client keyword arguments (token_file, tls) from :func:`add_client_access_flags`' flags."""
    tls = TLSFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) if (args.tls_ca or args.tls_cert) else None
    return {"token_file": args.auth_token_file or None, "tls": tls}
