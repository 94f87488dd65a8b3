"""Logging setup shared by every service: readable text for people, one JSON object per line for machines.

Membership and tunnel events pass node_id / node_name / mesh_ip through `extra=`; both formats print them.
The alias travels as `node_name` because `name` is a reserved LogRecord attribute (the logger's name):
`extra={"name": ...}` raises KeyError in logging.Logger.makeRecord.
"""

from __future__ import annotations

import json
import logging
import sys
import time

# Fields services attach with `extra=` that the formatters print when present.
CONTEXT_FIELDS = ("node_id", "node_name", "mesh_ip", "peer", "epoch", "revision", "event")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and any context fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            if hasattr(record, field):
                out[field] = getattr(record, field)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`HH:MM:SS.mmm LEVEL logger: message [key=value ...]`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        ctx = " ".join(f"{f}={getattr(record, f)}" for f in CONTEXT_FIELDS if hasattr(record, f))
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if ctx:
            line += f" [{ctx}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(*, level: str = "INFO", json_format: bool = False, stream=None) -> None:
    """Configure the root logger once, from a service's CLI."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter that is not ours stays at WARNING unless asked for.
    for noisy in ("amqtt", "transitions", "apscheduler", "uvicorn.access", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
