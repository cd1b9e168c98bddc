"""Scorer service: a thin gRPC adapter over the scorer backends in :mod:`haoping.scoring`."""
from __future__ import annotations

import argparse
import functools
import urllib.request

import grpc

from haoping.human_scorer import HumanScorePage, HumanScorer, ScoreCancelled, ScoreTimeout, TooManyPending
from haoping.labeling import start_web_server
from haoping.log import get_logger, setup_logging
from haoping.models import parse_dtype, pick_device
from haoping.scoring import build_scorer
from haoping.v1 import haoping_pb2 as pb
from haoping.v1 import haoping_pb2_grpc as pb_grpc
from services.common import metrics
from services.common.batching import DynamicBatcher, QueueFull
from services.common.config import add_batching_flags, add_common_server_flags, add_flag
from services.common.server import Draining, serve

log = get_logger(__name__)


class ScorerService(pb_grpc.ScorerServicer):
    def __init__(self, scorer, args, draining: Draining):
        self.scorer = scorer
        self.draining = draining
        self.max_texts = args.max_texts
        self.device, self.dtype = args.device, args.dtype
        self.batcher = DynamicBatcher("scorer", lambda texts, _stop: (scorer.score(texts), None),
                                      args.max_batch_size, args.max_wait_ms / 1000, args.max_queue)

    def _check(self, request, context) -> None:
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scorer is draining")
        if not request.texts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "texts must not be empty")
        if len(request.texts) > self.max_texts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"at most {self.max_texts} texts per request, got {len(request.texts)}")

    def _score_by_a_person(self, request, context):
        """Not through the batcher: each request is its own batch on the page, waiting as long as its deadline."""
        self._check(request, context)
        try:
            return self.scorer.score(list(request.texts), timeout=context.time_remaining(),
                                     is_cancelled=lambda: not context.is_active())
        except ScoreTimeout as err:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(err))
        except ScoreCancelled as err:
            context.abort(grpc.StatusCode.CANCELLED, str(err))
        except TooManyPending as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))

    def Score(self, request, context):
        if isinstance(self.scorer, HumanScorer):
            results = self._score_by_a_person(request, context)
        else:
            with self.batcher.arriving() as arrival:
                self._check(request, context)
                try:
                    results, _ = self.batcher.submit(list(request.texts), lambda: not context.is_active(), arrival)
                except QueueFull as err:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        metrics.SCORED_TEXTS.inc(len(results))
        for r in results:
            metrics.SCORE_VALUE.observe(r.score)
        return pb.ScoreResponse(
            scores=[pb.TextScore(score=r.score, label=r.label, raw_score=r.raw_score) for r in results],
            model_id=self.scorer.model_id, backend=self.scorer.backend)

    def GetInfo(self, request, context):
        return pb.ServiceInfo(service="scorer", model_id=self.scorer.model_id, backend=self.scorer.backend,
                              dtype=self.dtype, device=self.device,
                              max_context=int(getattr(self.scorer, "max_length", 0)),
                              limits={"max_texts": self.max_texts})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haoping serve scorer", description=__doc__)
    add_common_server_flags(parser, port=50052, metrics_port=9102)
    add_flag(parser, "--backend", "classifier",
             help="classifier (positive probability), reward-model, snownlp, or human (a person rates on a web page)")
    add_flag(parser, "--model", "starter:classifier",
             help="starter:classifier, a local dir, or a hub ID such as uer/roberta-base-finetuned-jd-binary-chinese")
    add_flag(parser, "--normalize", "none", help="reward-model scores: none, sigmoid or running (mean/std)")
    add_flag(parser, "--max-texts", 1024, int, "most texts in one Score request")
    add_flag(parser, "--human-host", "127.0.0.1", help="human backend: address of the rating page")
    add_flag(parser, "--human-port", 8090, int, "human backend: port of the rating page (0 picks a free one)")
    add_batching_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    scorer = build_scorer(args.backend, args.model, pick_device(args.device), parse_dtype(args.dtype), args.normalize)
    draining = Draining()
    service = ScorerService(scorer, args, draining)
    if isinstance(scorer, HumanScorer):
        scorer.max_pending = args.max_queue
        page = start_web_server(HumanScorePage(scorer), args.human_host, args.human_port)
        log.info("human scores: rate texts at %s", page.url)
        # a warm-up Score would wait for a person; serving means the rating page answers instead
        warm_up = functools.partial(check_page, page.url)
    else:
        warm_up = functools.partial(scorer.score, ["质量很好"])
    return serve("Scorer", args, lambda server: pb_grpc.add_ScorerServicer_to_server(service, server),
                 warm_up, draining)


def check_page(url: str) -> None:
    with urllib.request.urlopen(url, timeout=10) as reply:
        if reply.status != 200:
            raise RuntimeError(f"rating page {url} answered HTTP {reply.status}")
