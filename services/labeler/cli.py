"""`haoping label`: the rank-list labeling page as a command."""
from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

from haoping.labeling import RankingApp, generator_service_draw, in_process_draw, start_web_server
from haoping.prompts import DEFAULT_PROMPTS
from services.common.config import add_flag


def cmd_label(args) -> int:
    if args.k < 2:
        print(f"error: --k must be at least 2, got {args.k}", file=sys.stderr)
        return 2
    if args.generator:
        draw = generator_service_draw(args.generator, args.max_new_tokens, args.min_new_tokens)
    else:
        from haoping.models import pick_device

        if args.policy.startswith("starter:"):
            from haoping.bootstrap import ensure_starter_models

            ensure_starter_models()
        draw = in_process_draw(args.policy, args.max_new_tokens, args.min_new_tokens, pick_device(args.device))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed >= 0 else int.from_bytes(os.urandom(4), "little")
    app = RankingApp(draw, args.prompts or DEFAULT_PROMPTS, Path(args.out), k=args.k, seed=seed)
    server = start_web_server(app, args.host, args.port)
    print(f"labeling page at {server.url} ; rank lists go to {args.out} "
          f"({app.saved_before} there already); Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    finally:
        server.shutdown()
        print(f"saved {app.saved} rank list(s), skipped {app.skipped}", flush=True)
    return 0


def add_cli(subparsers) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "label", help="web page where a person ranks the policy's generations into a rank-list file")
    add_flag(p, "--out", "ranklists.tsv", help="rank-list file to append to (never rewritten)")
    add_flag(p, "--generator", "", help="host:port of a running generator (default: load --policy in-process)")
    add_flag(p, "--policy", "starter:policy", help="in-process policy: starter:policy, a dir or a hub ID")
    add_flag(p, "--k", 4, int, "generations to rank per group (one prompt)")
    add_flag(p, "--max-new-tokens", 16, int, "tokens per generation")
    add_flag(p, "--min-new-tokens", 8, int, "EOS not sampled before this many tokens")
    add_flag(p, "--seed", -1, int, "sampling seed (-1: a random one, so a restart shows new generations)")
    add_flag(p, "--host", "127.0.0.1", help="address the page listens on")
    add_flag(p, "--port", 8089, int, "page port (0 picks a free one)")
    add_flag(p, "--device", "auto", help="torch device for the in-process policy")
    p.add_argument("--prompts", nargs="+", default=None, help="prompts (default: the coordinator's four)")
    p.set_defaults(func=cmd_label)
