"""`haoping label`: the rank-list labeling page as a command."""
from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

from haoping.labeling import RankingApp, count_saved, generator_service_draw, in_process_draw
from haoping.webpage import start_web_server
from haoping.prompts import DEFAULT_PROMPTS
from services.common.config import add_flag


def cmd_label(args) -> int:
    if not 2 <= args.k <= 9:
        print(f"error: --k must be from 2 to 9 (one key per text), got {args.k}", file=sys.stderr)
        return 2
    if args.max_prompt_chars < 1:
        print(f"error: --max-prompt-chars must be at least 1, got {args.max_prompt_chars}", file=sys.stderr)
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
    app = RankingApp(draw, args.prompts or DEFAULT_PROMPTS, Path(args.out), k=args.k, seed=seed,
                     max_prompt_chars=args.max_prompt_chars)
    server = start_web_server(app, args.host, args.port)
    print(f"labeling page at {server.url} (English: {server.url}?lang=en); rank lists go to {args.out} "
          f"({count_saved(Path(args.out))} there already); Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    finally:
        server.shutdown()
        totals = app.totals()
        print(f"saved {totals['saved']} rank list(s), skipped {totals['skipped']}, removed {totals['removed']}",
              flush=True)
    return 0


def add_cli(subparsers) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "label", help="web page where a person ranks the policy's generations into a rank-list file")
    add_flag(p, "--out", "ranklists.tsv",
             help="rank-list file to append to; a removed line moves to <out>.removed (several pages may share it)")
    add_flag(p, "--generator", "", help="host:port of a running generator (default: load --policy in-process)")
    add_flag(p, "--policy", "starter:policy", help="in-process policy: starter:policy, a dir or a hub ID")
    add_flag(p, "--k", 4, int, "generations to rank per group (one prompt), 2-9")
    add_flag(p, "--max-prompt-chars", 64, int, "longest prompt a person may type")
    add_flag(p, "--max-new-tokens", 16, int, "tokens per generation")
    add_flag(p, "--min-new-tokens", 8, int, "EOS not sampled before this many tokens")
    add_flag(p, "--seed", -1, int, "sampling seed (-1: a random one, so a restart shows new generations)")
    add_flag(p, "--host", "127.0.0.1", help="address the page listens on")
    add_flag(p, "--port", 8089, int, "page port (0 picks a free one)")
    add_flag(p, "--device", "auto", help="torch device for the in-process policy")
    p.add_argument("--prompts", nargs="+", default=None, help="the pool random prompts come from (default: the coordinator's four)")
    p.set_defaults(func=cmd_label)
