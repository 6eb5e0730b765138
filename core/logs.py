"""One logging setup for every ``kvmarina`` process: text for people, JSON lines for
log collectors (Loki, Elasticsearch, Cloud Logging parse one object per line and
keep its fields, where a text line would be one opaque string).

Every command takes ``--log-format text|json``, defaulting to ``KVMARINA_LOG_FORMAT``
so that a Deployment sets it once in the environment, and calls ``setup_logging``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

FORMAT_ENV = "KVMARINA_LOG_FORMAT"
LEVEL_ENV = "KVMARINA_LOG_LEVEL"
FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_format(value: str) -> str:
    """argparse ``type`` of ``--log-format``; argparse also runs it on a string default,
    so a bad ``KVMARINA_LOG_FORMAT`` is refused like a bad flag."""
    v = value.strip().lower()
    if v not in FORMATS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a log format (text or json)")
    return v


def log_level(value: str) -> str:
    """argparse ``type`` of ``--log-level`` (checked on an environment default too)."""
    v = value.strip().lower()
    if v not in LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a log level ({', '.join(LEVELS)})")
    return v


def add_log_format_option(
    parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None
) -> None:
    e = os.environ if env is None else env
    parser.add_argument(
        "--log-format",
        type=log_format,
        default=e.get(FORMAT_ENV, "text"),
        help=f"text or json (one JSON object a line); default ${FORMAT_ENV} or text",
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, and ``exception`` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # kopf's per-object loggers name the object only in this field; its own text
        # formatter would print it as a prefix, which ours does not
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict):
            doc["object"] = {k: ref[k] for k in ("kind", "namespace", "name") if ref.get(k)}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            doc["exception"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger (replacing any handler a library installed first)."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(
        JsonFormatter() if log_format(fmt) == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
