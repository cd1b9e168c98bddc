"""Scorer service: a thin gRPC adapter over any :class:`haoping.scorers.Scorer` backend.

A batchable backend is called through the dynamic batcher (concurrent requests share one model
call); any other is called once per request with the request's deadline and cancellation."""
from __future__ import annotations

import argparse

import grpc

from haoping.log import get_logger, setup_logging
from haoping.models import parse_dtype, pick_device
from haoping.scorers import ScoreCancelled, Scorer, ScorerBusy, ScoreTimeout, in_unit_interval
from haoping.scorers.base import WARM_UP_TEXTS
from haoping.scorers.backends import BACKENDS, build_scorer
from haoping.v1 import haoping_pb2 as pb
from haoping.v1 import haoping_pb2_grpc as pb_grpc
from services.common import metrics
from services.common.batching import DynamicBatcher, QueueFull
from services.common.config import add_batching_flags, add_common_server_flags, add_flag
from services.common.security import check_security_flags
from services.common.server import Draining, configure_torch, serve

log = get_logger(__name__)


class ScorerService(pb_grpc.ScorerServicer):
    def __init__(self, scorer: Scorer, args, draining: Draining):
        self.scorer = scorer
        self.draining = draining
        self.max_texts = args.max_texts
        self.max_text_chars = args.max_text_chars
        self.device, self.dtype = args.device, args.dtype
        self.batcher = DynamicBatcher("scorer", lambda texts, _stop: (scorer.score(texts), None),
                                      args.max_batch_size, args.max_wait_ms / 1000,
                                      args.max_queue) if scorer.batchable else None

    def warm_up(self) -> None:
        """A batchable backend warms up through the batcher, on the thread that will score: torch
        work on a second thread would start a second OpenMP team (see the generator's warm-up)."""
        if self.batcher is None:
            self.scorer.warm_up()
        else:
            self.batcher.submit(WARM_UP_TEXTS)

    def _check(self, request, context) -> None:
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scorer is draining")
        if not request.texts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "texts must not be empty")
        if request.normalization not in pb.ScoreNormalization.values():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"normalization {request.normalization} is not one of {pb.ScoreNormalization.keys()}")
        if len(request.texts) > self.max_texts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"at most {self.max_texts} texts per request, got {len(request.texts)}")
        for i, text in enumerate(request.texts):  # by size, before any tokenizing
            if len(text) > self.max_text_chars:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"text {i} has {len(text)} characters; at most {self.max_text_chars} (--max-text-chars)")
            if not text.strip():
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"text {i} is empty")

    def _score(self, request, context):
        cancelled = lambda: not context.is_active()  # noqa: E731
        if self.batcher is None:
            self._check(request, context)
            return self.scorer.score(list(request.texts), timeout=context.time_remaining(), is_cancelled=cancelled)
        with self.batcher.arriving() as arrival:
            self._check(request, context)
            results, _ = self.batcher.submit(list(request.texts), cancelled, arrival)
            return results

    def Score(self, request, context):
        try:
            results = self._score(request, context)
        except ScoreTimeout as err:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(err))
        except ScoreCancelled as err:
            context.abort(grpc.StatusCode.CANCELLED, str(err))
        except (QueueFull, ScorerBusy) as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        metrics.SCORED_TEXTS.inc(len(results))
        for r in results:
            metrics.SCORE_VALUE.observe(r.score)
        if request.normalization == pb.SCORE_NORMALIZATION_SIGMOID:
            results = in_unit_interval(results, self.scorer.scores_in_unit_interval)
        return pb.ScoreResponse(
            scores=[pb.TextScore(score=r.score, label=r.label, raw_score=r.raw_score, truncated=r.truncated)
                    for r in results],
            model_id=self.scorer.model_id, backend=self.scorer.backend)

    def GetInfo(self, request, context):
        return pb.ServiceInfo(service="scorer", model_id=self.scorer.model_id, backend=self.scorer.backend,
                              dtype=self.dtype, device=self.device, max_context=self.scorer.max_length,
                              limits={"max_texts": self.max_texts, "max_text_chars": self.max_text_chars})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haoping serve scorer", description=__doc__)
    add_common_server_flags(parser, port=50052, metrics_port=9102)
    add_flag(parser, "--backend", "classifier", choices=BACKENDS,
             help="classifier (positive probability), reward-model, snownlp, or human (a person rates on a web page)")
    add_flag(parser, "--model", "starter:classifier",
             help="starter:classifier, a local dir, or a hub ID such as uer/roberta-base-finetuned-jd-binary-chinese")
    add_flag(parser, "--max-texts", 1024, int, "most texts in one Score request")
    add_flag(parser, "--max-text-chars", 4096, int,
             "longest text in characters, checked before tokenizing (INVALID_ARGUMENT beyond); a text within it "
             "but longer than the model's context is scored on its first max_context tokens")
    add_flag(parser, "--human-host", "127.0.0.1", help="human backend: address of the rating page")
    add_flag(parser, "--human-port", 8090, int, "human backend: port of the rating page (0 picks a free one)")
    add_batching_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    check_security_flags(parser, args)
    configure_torch(args)
    scorer = build_scorer(args.backend, args.model, pick_device(args.device), parse_dtype(args.dtype),
                          human_host=args.human_host, human_port=args.human_port, max_pending=args.max_queue)
    scorer.start()
    draining = Draining()
    service = ScorerService(scorer, args, draining)
    try:
        return serve("Scorer", args, lambda server: pb_grpc.add_ScorerServicer_to_server(service, server),
                     service.warm_up, draining)
    finally:
        scorer.stop()
