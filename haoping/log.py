"""The one logger setup. Every entry point calls :func:`setup_logging` once."""
from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("HAOPING_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S", force=True)
    # transformers is chatty about things we do on purpose (e.g. re-initialized heads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars on every service start


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
