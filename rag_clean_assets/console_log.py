"""The terminal's run log: INFO by default, one short line per message, the collection on every line.

Dagster's default console logger prints every structured event at DEBUG (151 of the sample job's 247
lines) with the job name and a 36-character run id on each line. This one prints

    12:03:19 [sample] dense_embeddings__minilm: minilm: 92/147 chunks (62.6%), ...

and, at INFO, only what the assets log plus the run's end. `RAG_CLEAN_LOG_LEVEL=DEBUG` (the main job's
`--verbose`, rag-clean's `--log-level DEBUG`) or run config `loggers: {console: {config: {log_level: DEBUG}}}`
brings Dagster's events back.
"""

from __future__ import annotations

import logging
import sys
import time

import dagster as dg

from rag_clean.config.settings import process_setting

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Dagster events worth a line at INFO although Dagster logs them at DEBUG: how the run ended.
RUN_END_EVENTS = {"RUN_SUCCESS": "run succeeded", "RUN_CANCELED": "run canceled"}
# Dagster's own INFO lines that repeat what an asset said: "Skipping step <check> due to skipped dependencies"
# (the execution plan's message when an asset such as exports, off by default, yielded nothing), right after
# the asset's own "skipped: <reason>" line. Shown at DEBUG.
REPEATED_MESSAGES = ("Skipping step ",)


def default_log_level(environ=None) -> str:
    return str(process_setting("log_level", environ))


def short_line(record: logging.LogRecord) -> str:
    """'HH:MM:SS [collection] step: message' from a record the Dagster log handler annotated."""
    meta = getattr(record, "dagster_meta", None) or {}
    event = meta.get("dagster_event")
    message = meta.get("orig_message") or record.getMessage()
    if event is not None and event.event_type_value in RUN_END_EVENTS:
        message = RUN_END_EVENTS[event.event_type_value]
    collection = (meta.get("job_tags") or {}).get("dagster/partition")
    parts = [time.strftime("%H:%M:%S", time.localtime(record.created))]
    if collection:
        parts.append(f"[{collection}]")
    if meta.get("step_key"):
        parts.append(f"{meta['step_key']}:")
    if record.levelno != logging.INFO:
        parts.append(f"{record.levelname}:")
    return " ".join(parts + [message])


class _ShortHandler(logging.StreamHandler):
    def __init__(self, level: int):
        super().__init__(sys.stderr)
        self.threshold = level

    def filter(self, record: logging.LogRecord) -> bool:
        meta = getattr(record, "dagster_meta", None) or {}
        event = meta.get("dagster_event")
        if event is None and str(meta.get("orig_message") or "").startswith(REPEATED_MESSAGES):
            return self.threshold <= logging.DEBUG
        return record.levelno >= self.threshold or (event is not None and event.event_type_value in RUN_END_EVENTS)

    def format(self, record: logging.LogRecord) -> str:
        return short_line(record)


def short_console_logger_def() -> dg.LoggerDefinition:
    @dg.logger(config_schema={"log_level": dg.Field(str, default_value=default_log_level(),
                                                    description=f"one of {', '.join(LEVELS)}")},
               description="Short lines at INFO by default (log_level setting); Dagster's events at DEBUG.")
    def short_console(init_context: dg.InitLoggerContext) -> logging.Logger:
        level = str(init_context.logger_config["log_level"]).upper()
        if level not in LEVELS:
            raise ValueError(f"console logger log_level {level!r}: expected one of {', '.join(LEVELS)}")
        # A logger object of its own (not logging.getLogger): a second run in this process adds no second handler.
        logger = logging.Logger("rag_clean.console", level=logging.DEBUG)
        logger.addHandler(_ShortHandler(getattr(logging, level)))
        return logger

    return short_console
