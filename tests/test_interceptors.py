"""The server interceptors in process, on a stand-in servicer: unexpected errors become INTERNAL
with a logged request id, the token check without a token file, the open and protected method
lists, and the metrics counted the same way for unary and streaming calls."""
import logging
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest

from haoping.client import make_channel
from haoping.v1 import haoping_pb2 as pb
from haoping.v1 import haoping_pb2_grpc as pb_grpc
from services.common import metrics
from services.common.interceptors import READ_METHODS, needs_token
from services.common.security import ServerSecurity
from services.common.server import server_interceptors


class BrokenTrainer(pb_grpc.TrainerServicer):
    """GetInfo fails as an unforeseen bug would; GetWeights fails after one chunk; Step aborts on purpose."""

    def GetInfo(self, request, context):
        return [][1]  # IndexError

    def GetWeights(self, request, context):
        yield pb.WeightsChunk(policy_version=1, data=b"x")
        raise RuntimeError("disk vanished")

    def Step(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "a status the handler chose")

    def SaveCheckpoint(self, request, context):
        return pb.SaveCheckpointResponse(directory="reached")


def _security(token=None, insecure=False, reads=False):
    return ServerSecurity(token=token, require_token_for_reads=reads, insecure_no_auth=insecure, credentials=None,
                          client_tls=None)


@pytest.fixture
def serve_trainer():
    servers = []

    def start(security):
        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=server_interceptors("trainer", security))
        pb_grpc.add_TrainerServicer_to_server(BrokenTrainer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def _counter(counter, *labels) -> float:
    return counter.labels(*labels)._value.get()


def test_unexpected_errors_become_internal_with_a_logged_request_id(serve_trainer, caplog):
    address = serve_trainer(_security(insecure=True))
    before = _counter(metrics.INTERNAL_ERRORS, "trainer", "GetInfo")
    with make_channel(address) as channel, caplog.at_level(logging.ERROR):
        stub = pb_grpc.TrainerStub(channel)
        with pytest.raises(grpc.RpcError) as unary:
            stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        stream = stub.GetWeights(pb.GetWeightsRequest(), timeout=10)
        assert next(stream).data == b"x"
        with pytest.raises(grpc.RpcError) as streamed:
            next(stream)
        with pytest.raises(grpc.RpcError) as chosen:
            stub.Step(pb.StepRequest(), timeout=10)
    for err in (unary.value, streamed.value):
        assert err.code() == grpc.StatusCode.INTERNAL
        request_id = dict(err.trailing_metadata())["haoping-request-id"]
        assert request_id in err.details() and "Traceback" not in err.details() and "IndexError" not in err.details()
        logged = [r for r in caplog.records if request_id in r.getMessage()]
        assert logged and logged[0].exc_info is not None  # the traceback is in the log, under the id
    assert chosen.value.code() == grpc.StatusCode.NOT_FOUND and chosen.value.details() == "a status the handler chose"
    assert _counter(metrics.INTERNAL_ERRORS, "trainer", "GetInfo") == before + 1


def test_without_a_token_file_the_protected_rpcs_are_refused_and_say_how_to_configure(serve_trainer):
    address = serve_trainer(_security(token=None))
    with make_channel(address, token="anything") as channel:
        stub = pb_grpc.TrainerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SaveCheckpoint(pb.SaveCheckpointRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as read:
            stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--auth-token-file" in refused.value.details() and "--insecure-no-auth" in refused.value.details()
    assert read.value.code() == grpc.StatusCode.INTERNAL  # a read is open: it reached the (broken) handler


def test_insecure_no_auth_serves_open_and_a_token_guards_reads_when_asked(serve_trainer):
    with make_channel(serve_trainer(_security(insecure=True))) as channel:
        assert pb_grpc.TrainerStub(channel).SaveCheckpoint(pb.SaveCheckpointRequest(), timeout=10).directory == "reached"
    address = serve_trainer(_security(token="s3cret", reads=True))
    for token, expected in ((None, grpc.StatusCode.UNAUTHENTICATED), ("s3cre", grpc.StatusCode.UNAUTHENTICATED),
                            ("s3cret", grpc.StatusCode.INTERNAL)):
        with make_channel(address, token=token) as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.TrainerStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
        assert err.value.code() == expected, token
    with make_channel(address, token="s3cret") as channel:
        assert pb_grpc.TrainerStub(channel).SaveCheckpoint(pb.SaveCheckpointRequest(), timeout=10).directory == "reached"


def test_every_method_is_a_read_or_protected_and_reads_are_real_methods():
    methods = {f"/{service.full_name}/{method.name}" for service in pb.DESCRIPTOR.services_by_name.values()
               for method in service.methods}
    assert READ_METHODS <= methods
    protected = {m for m in methods if needs_token(m, require_for_reads=False)}
    assert protected == {"/haoping.v1.Trainer/Step", "/haoping.v1.Trainer/GetWeights",
                         "/haoping.v1.Trainer/SaveCheckpoint", "/haoping.v1.Generator/LoadWeights",
                         "/haoping.v1.Trainer/OpenWeightGroup", "/haoping.v1.Trainer/JoinWeightGroup",
                         "/haoping.v1.Trainer/BroadcastWeights", "/haoping.v1.Generator/JoinWeightGroup",
                         "/haoping.v1.Generator/ReceiveWeights"}
    assert all(needs_token(m, require_for_reads=True) for m in methods)
    assert not needs_token("/grpc.health.v1.Health/Check", require_for_reads=True)
    assert not needs_token("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", require_for_reads=True)
    assert needs_token("/haoping.v1.Trainer/SomethingAddedLater", require_for_reads=False)  # protected by default


def test_metrics_count_unary_and_streaming_calls_alike(serve_trainer):
    address = serve_trainer(_security(token="s3cret"))
    labels = [("trainer", "Step", "UNAUTHENTICATED"), ("trainer", "GetWeights", "UNAUTHENTICATED"),
              ("trainer", "Step", "NOT_FOUND")]
    before = [_counter(metrics.REQUESTS, *label) for label in labels]
    with make_channel(address) as anonymous, make_channel(address, token="s3cret") as authorized:
        for call in (lambda: pb_grpc.TrainerStub(anonymous).Step(pb.StepRequest(), timeout=10),
                     lambda: list(pb_grpc.TrainerStub(anonymous).GetWeights(pb.GetWeightsRequest(), timeout=10)),
                     lambda: pb_grpc.TrainerStub(authorized).Step(pb.StepRequest(), timeout=10)):
            with pytest.raises(grpc.RpcError):
                call()
    assert [_counter(metrics.REQUESTS, *label) for label in labels] == [b + 1 for b in before]
    assert _counter(metrics.AUTH_FAILURES, "trainer", "GetWeights", "missing") >= 1
    assert metrics.IN_FLIGHT.labels("trainer")._value.get() == 0


def test_security_flags(tmp_path):
    token = tmp_path / "token"
    token.write_text("  abc \n")
    token.chmod(0o600)
    flags = dict(auth_token_file=str(token), require_token_for_reads=False, insecure_no_auth=False,
                 tls_cert="", tls_key="", tls_ca="")
    assert ServerSecurity.from_args(SimpleNamespace(**flags)).token == "abc"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        ServerSecurity.from_args(SimpleNamespace(**{**flags, "auth_token_file": str(empty)}))
