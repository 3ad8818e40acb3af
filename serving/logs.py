"""Log lines of cnn-serve: text for people, or one JSON object per line for log pipelines."""

from __future__ import annotations

import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str, level: str) -> None:
    """Every convserve logger to stderr, in `fmt` ("text" or "json"), at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# Triton's log settings (LogSettings RPC) over the convserve loggers' level. The verbose
# level maps to DEBUG; log_info / log_warning / log_error say which levels are written.
LOGGER = "convserve"
LOG_SETTING_KEYS = (
    "log_file",
    "log_info",
    "log_warning",
    "log_error",
    "log_verbose_level",
    "log_format",
)


def log_settings(fmt: str) -> dict[str, bool | int | str]:
    """The running log settings, in Triton's keys (`fmt`: the server's --log-format)."""
    level = logging.getLogger(LOGGER).getEffectiveLevel()
    return {
        "log_file": "",  # stderr
        "log_info": level <= logging.INFO,
        "log_warning": level <= logging.WARNING,
        "log_error": level <= logging.ERROR,
        "log_verbose_level": 1 if level <= logging.DEBUG else 0,
        "log_format": "default" if fmt == "text" else fmt,
    }


def change_log_settings(fmt: str, changes: dict[str, bool | int | str]) -> None:
    """Apply Triton-keyed changes to the convserve loggers' level; ValueError says why a
    change cannot be made (an unknown key, a log file, another format)."""
    settings = log_settings(fmt)
    for key, value in changes.items():
        if key not in LOG_SETTING_KEYS:
            raise ValueError(f"unknown log setting {key!r}; settings are {list(LOG_SETTING_KEYS)}")
        if key in ("log_file", "log_format") and value != settings[key]:
            raise ValueError(f"{key} cannot be changed while running (it is {settings[key]!r})")
        settings[key] = value
    if settings["log_verbose_level"]:
        level = logging.DEBUG
    elif settings["log_info"]:
        level = logging.INFO
    elif settings["log_warning"]:
        level = logging.WARNING
    elif settings["log_error"]:
        level = logging.ERROR
    else:
        level = logging.CRITICAL
    logging.getLogger(LOGGER).setLevel(level)
