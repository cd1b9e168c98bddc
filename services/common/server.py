"""Shared gRPC server plumbing: health, reflection, metrics, message limits, SIGTERM drain.

A service module builds its servicer(s) and calls :func:`serve`. The health status turns
SERVING only after the service's warm-up succeeded, and NOT_SERVING as soon as draining starts.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from haoping.atomic import atomic_write_text
from haoping.log import get_logger
from haoping.models import use_deterministic_kernels
from haoping.v1 import haoping_pb2
from services.common.interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor
from services.common.metrics import start_metrics_server
from services.common.security import SecurityConfigError, ServerSecurity, add_listening_port

log = get_logger(__name__)


def full_service_name(short: str) -> str:
    return haoping_pb2.DESCRIPTOR.services_by_name[short].full_name


class Draining:
    """Set once SIGTERM arrived; servicers answer UNAVAILABLE to new work after that."""

    def __init__(self):
        self.event = threading.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()


PARENT_POLL_SECONDS = 0.5


def exit_with_parent() -> None:
    """When started by a coordinator (HAOPING_PARENT_PID), die with it whatever ends it, kill -9
    included: a daemon thread exits the process once it has another parent. (The kernel's
    PR_SET_PDEATHSIG would fire when the *thread* that started us ends, which kills services a
    launcher started from a worker thread.)"""
    parent = os.environ.get("HAOPING_PARENT_PID")
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(PARENT_POLL_SECONDS)
        log.warning("coordinator %s is gone; exiting", parent)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class ComputeThread:
    """One thread for a process's model work. gRPC runs each call on whichever pool thread is
    free, and torch work on a second thread starts a second OpenMP team: with more OpenMP threads
    than cores libgomp stops spin-waiting, and every op gets slower. :meth:`run` hands the work
    to this thread and waits for it (called on the thread itself, it just runs it)."""

    def __init__(self, name: str):
        self._thread: threading.Thread | None = None
        self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix=name, initializer=self._started)

    def _started(self) -> None:
        self._thread = threading.current_thread()

    def run(self, fn: Callable, *args, **kwargs):
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()


def configure_torch(args) -> None:
    """--threads and --deterministic, before any model is built (every process of a service)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    use_deterministic_kernels(args.deterministic)


def server_interceptors(service: str, security: ServerSecurity) -> list[grpc.ServerInterceptor]:
    """Outermost first: metrics see the final code of every call, refused ones included."""
    return [MetricsInterceptor(service), ErrorInterceptor(service),
            AuthInterceptor(service, security.token, security.require_token_for_reads, security.insecure_no_auth)]


def serve(short_name: str, args, register: Callable[[grpc.Server], None],
          warm_up: Callable[[], None] | None = None, draining: Draining | None = None) -> int:
    """Run a service until SIGTERM/SIGINT; returns the process exit code."""
    exit_with_parent()
    if getattr(args, "gil_switch_ms", None):
        sys.setswitchinterval(args.gil_switch_ms / 1000)
    draining = Draining() if draining is None else draining
    try:
        security = ServerSecurity.from_args(args)
    except SecurityConfigError as err:
        log.error("%s: %s", short_name, err)
        return 2
    limit = args.max_message_mb * 1024 * 1024
    # a batching service needs a thread for every caller waiting in its queue, or the pool
    # (not the batcher) caps how many requests can be merged into one batch
    max_workers = args.rpc_threads or getattr(args, "max_queue", 8) + 8
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=short_name.lower()),
        interceptors=server_interceptors(short_name.lower(), security),
        options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                 ("grpc.so_reuseport", 0)],
    )
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    name = full_service_name(short_name)
    for service in ("", name):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = add_listening_port(server, f"{args.host}:{args.port}", security)
    if port == 0:
        raise SystemExit(f"cannot listen on {args.host}:{args.port}")
    metrics_port = start_metrics_server(args.host, args.metrics_port, short_name.lower())
    server.start()
    log.info("%s listening on %s:%d, metrics on :%d", short_name, args.host, port, metrics_port)
    log.info("%s access: %s", short_name, security.describe())

    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("%s: signal %d, draining for up to %.0fs", short_name, signum, args.grace_seconds)
        draining.event.set()
        for service in ("", name):
            health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if warm_up is not None:
        warm_up()  # a real request through the model; SERVING means it answered
    for service in ("", name):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving", short_name)
    if args.ready_file:
        # address, metrics port and process id; written atomically: never read half-written
        atomic_write_text(args.ready_file, f"{args.host}:{port} {metrics_port} {os.getpid()}\n")

    # a signal the kernel hands to a gRPC thread runs its Python handler only when the main thread
    # next executes bytecode: wake it often, or SIGTERM could wait until the next RPC
    while not stop.wait(0.2):
        pass
    # stay reachable briefly so health checkers see NOT_SERVING; new work already gets UNAVAILABLE
    time.sleep(min(args.drain_announce_seconds, args.grace_seconds))
    server.stop(args.grace_seconds).wait()
    log.info("%s stopped", short_name)
    return 0
