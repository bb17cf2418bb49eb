"""Resolving the declared settings (rag_clean.config.declaration), with the source of every value.

Run settings (EMBEDDER_*), lowest to highest: defaults < config file < .env file < process environment <
run config / CLI flags. Each remembers which source won ("default", "config file", ".env",
"override via env", "run config" or "cli"), and telemetry records it.
Process settings (RAG_CLEAN_*): default < environment < an explicit resource field or flag.

`python -m rag_clean.config.settings --markdown` prints the README's settings table.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from dataclasses import field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from rag_clean.config.declaration import BY_ENV, BY_KEY, PROCESS, RUN, Setting, markdown_table, process_settings, run_settings
from rag_clean.config.values import SettingsError, did_you_mean, parse_value

__all__ = ["EmbedderSettings", "SettingsError", "resolve_settings", "process_setting", "given_process_settings",
           "process_provenance_lines", "RETIRED_SETTINGS", "CONFIG_FILE_ENV"]

CONFIG_FILE_ENV = BY_KEY["config_file"].env
DEFAULT_CONFIG_FILE = Path(BY_KEY["config_file"].default)

PROVENANCE_DEFAULT = "default"
PROVENANCE_CONFIG = "config file"
PROVENANCE_DOTENV = ".env"
PROVENANCE_ENV = "override via env"

# Settings of the old embedder that no longer choose anything: accepted (so old config files, .env files
# and scripts keep working) and reported once in the run's warnings, never silently dropped.
RETIRED_SETTINGS = {s.key: s.retired for s in run_settings(retired=True) if s.retired}
_PY_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "choice": str, "list": tuple[str, ...]}


class _Methods:
    """Behaviour of EmbedderSettings; its fields are generated from the declaration below."""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("provenance", "notes")]

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(self, k)) for k in self.keys())}

    def provenance_lines(self, chosen_only: bool = False) -> list[str]:
        """`key=value (source)` per setting; chosen_only: only those not at their default."""
        values = self.as_dict()
        sources = {k: self.provenance.get(k, PROVENANCE_DEFAULT) for k in self.keys()}
        return [f"{k}={json.dumps(values[k])} ({src})" for k, src in sources.items()
                if not (chosen_only and src == PROVENANCE_DEFAULT)]

    def with_overrides(self, overrides: Mapping[str, Any], source: str, where: str | None = None):
        """Apply overrides by key (None values are ignored), marked with `source`; errors name `where`."""
        return self._apply([(k, v, f"{where or source}: {k}") for k, v in overrides.items()], source)

    def _apply(self, items: list[tuple[str, Any, str]], source: str):
        values, prov, notes = {}, dict(self.provenance), list(self.notes)
        for key, raw, where in items:
            if raw is None:
                continue
            setting = BY_KEY.get(key)
            if setting is None or setting.scope != RUN:
                raise SettingsError(_unknown(key, where.rsplit(": ", 1)[0]))
            value = parse_value(setting, raw, where)
            if setting.retired:
                notes.append(f"{setting.retired} (given as {raw!r} by {source})")
                continue
            values[key] = value
            prov[key] = source
        return replace(self, **values, provenance=prov, notes=tuple(notes))


EmbedderSettings = make_dataclass(
    "EmbedderSettings",
    [(s.key, _PY_TYPES[s.kind], field(default=s.default)) for s in run_settings()]
    + [("provenance", Mapping[str, str], field(default_factory=dict, compare=False)),
       ("notes", tuple[str, ...], field(default=(), compare=False))],  # retired settings that were given
    bases=(_Methods,), frozen=True,
)
EmbedderSettings.__module__ = __name__
EmbedderSettings.__doc__ = "The resolved run settings (one field per RUN setting of rag_clean.config.declaration)."


def _unknown(key: str, where: str) -> str:
    setting = BY_KEY.get(key)
    if setting is not None and setting.scope == PROCESS:
        return f"{where}: {key!r} is a process setting: set {setting.env} in the environment"
    return f"{where}: unknown setting {key!r}{did_you_mean(key, [s.key for s in run_settings(retired=True)])}"


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc}") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: top level must be an object")
    return data.get("embedder", data) if isinstance(data.get("embedder"), dict) else data


def _env_items(env: Mapping[str, str], where: str = "") -> list[tuple[str, Any, str]]:
    """(key, raw, where) of each run setting given in `env`; an empty value means unset."""
    return [(s.key, env[s.env], f"{where}{s.env}") for s in run_settings(retired=True) if env.get(s.env, "") != ""]


def _check_dotenv_keys(env: Mapping[str, str], path: Path) -> None:
    """Refuse what a .env file cannot mean: a process setting (read from the environment only) or a name
    that is not a setting but looks like one (a typo would otherwise be silently ignored)."""
    run_names = [s.env for s in run_settings(retired=True)]
    for name in env:
        setting = BY_ENV.get(name)
        if setting is not None and setting.scope == RUN:
            continue
        if setting is not None:
            raise SettingsError(f".env {path}: {name} is a process setting, read from the environment only "
                                f"(every process Dagster starts reads it there): export it instead")
        hint = did_you_mean(name, BY_ENV) or (f" (did you mean {BY_KEY[name.lower()].env!r}?)"
                                              if name.lower() in BY_KEY else "")
        if hint or name.startswith(("EMBEDDER_", "RAG_CLEAN_")):
            raise SettingsError(f".env {path}: unknown setting {name}{hint}; known: {', '.join(run_names)}")


def resolve_settings(
    *,
    config_file: str | os.PathLike | None = None,
    dotenv_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    override_source: str = "run config",
) -> EmbedderSettings:
    """Resolve the run settings through every layer; see the module docstring for the order."""
    environ = os.environ if environ is None else environ
    settings = EmbedderSettings(provenance={k: PROVENANCE_DEFAULT for k in EmbedderSettings.keys()})

    path = Path(config_file) if config_file else Path(process_setting("config_file", environ))
    if path.exists():
        settings = settings.with_overrides(_read_config_file(path), PROVENANCE_CONFIG, f"config file {path}")
    elif config_file:
        raise SettingsError(f"config file {path} does not exist")

    dotenv_path = Path(dotenv_file) if dotenv_file else Path(".env")
    if dotenv_path.exists():
        from dotenv import dotenv_values

        values = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
        _check_dotenv_keys(values, dotenv_path)
        settings = settings._apply(_env_items(values, f".env {dotenv_path}: "), PROVENANCE_DOTENV)

    settings = settings._apply(_env_items(environ), PROVENANCE_ENV)
    if overrides:
        settings = settings.with_overrides(overrides, override_source)
    return settings


# ---------------------------------------------------------------- process settings


def _process(key: str) -> Setting:
    setting = BY_KEY[key]
    if setting.scope != PROCESS:
        raise KeyError(f"{key} is a run setting: read it from the run plan")
    return setting


def process_setting(key: str, environ: Mapping[str, str] | None = None) -> Any:
    """The value of process setting `key` (declaration.py) from the environment, strictly parsed;
    its default when unset or empty. Read per call, so a changed environment (tests) is seen."""
    setting = _process(key)
    raw = (os.environ if environ is None else environ).get(setting.env, "")
    return setting.default if not raw.strip() else parse_value(setting, raw, setting.env)


def given_process_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """{key: value} of every process setting set in the environment, each parsed now: a caller that starts
    work (rag-clean, the definitions) learns of a bad value before any step runs, not when a step reads it."""
    env = os.environ if environ is None else environ
    return {s.key: process_setting(s.key, env) for s in process_settings() if env.get(s.env, "").strip()}


def process_provenance_lines(environ: Mapping[str, str] | None = None) -> list[str]:
    """Each process setting given in the environment, as `VAR=value (override via env)`; secrets hidden."""
    return [f"{BY_KEY[k].env}={'<set>' if BY_KEY[k].secret else json.dumps(v)} ({PROVENANCE_ENV})"
            for k, v in given_process_settings(environ).items()]


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m rag_clean.config.settings --markdown")
    print(markdown_table())
