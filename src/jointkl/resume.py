"""What a resumed run may change, and the checks that it sees the same model and data.

``jointkl fit ... --resume`` continues the run recorded in the run directory's
``config.json``: its model, model settings, engine, engine settings, seed and data are reused
unless the command line says otherwise, and only the settings in :data:`RESUMABLE` (how long
and how fast the loop goes on) may differ. Anything else would make the checkpoint mean
something else (other shapes, another guide, another batch order), so it is refused before
any work starts, naming the setting and both values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jointkl.errors import InputError

__all__ = [
    "RESUMABLE",
    "saved_config",
    "check_same",
    "engine_base",
    "check_engine_config",
    "check_model_settings",
    "check_model",
]

# Settings a resume may change: the loop's length and step size, its checkpoint interval,
# and the device (a checkpoint is read onto the CPU and moved to the run's device).
RESUMABLE = frozenset(
    {
        "steps",
        "lr",
        "clip_norm",
        "lr_schedule",
        "early_stopping",
        "checkpoint_every",
        "progress",
        "device",
    }
)
# Settings the command line itself sets per run directory.
_RUN_LOCAL = frozenset({"checkpoint_dir", "resume"})


def _plain(value: Any) -> Any:
    """JSON round trip, so tuples and lists, ints and floats compare as recorded."""
    return json.loads(json.dumps(value, default=str))


def saved_config(run) -> dict[str, Any]:
    """The ``config.json`` of ``run`` (a :class:`~jointkl.runs.RunDir`), checked for the
    keys a resume needs."""
    path = run.path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--resume: {path} is unreadable ({e}); expected a run's config") from e
    missing = [
        k
        for k in ("model", "model_spec", "engine", "engine_config", "seed")
        if not isinstance(config, dict) or k not in config
    ]
    if missing:
        raise InputError(f"--resume: {path} lacks {missing}; expected a run's config")
    return config


def check_same(what: str, given: Any, saved: Any) -> None:
    """Refuse a resume whose ``what`` differs from the run's."""
    if given is not None and _plain(given) != _plain(saved):
        raise InputError(
            f"--resume: {what} {given!r} differs from the run's {saved!r}; resume with the "
            f"run's own, or start a new run (--overwrite or another --out)"
        )


def engine_base(saved: Mapping[str, Any], params: set[str]) -> dict[str, Any]:
    """The run's recorded engine settings that the engine takes again (not the ones the
    command line sets per run directory, nor in-memory objects recorded by name)."""
    return {
        k: v
        for k, v in saved["engine_config"].items()
        if k in params and k not in _RUN_LOCAL and v != "callable"
    }


def check_engine_config(config: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Refuse engine settings that differ from the run's outside :data:`RESUMABLE`."""
    recorded = saved["engine_config"]
    for key, value in config.items():
        if key in RESUMABLE or key in _RUN_LOCAL or key not in recorded:
            continue
        if _plain(value) != _plain(recorded[key]):
            raise InputError(
                f"--resume: {key}={value!r} differs from the run's {recorded[key]!r}; only "
                f"{', '.join(sorted(RESUMABLE))} may change on resume (start a new run with "
                f"--overwrite or another --out otherwise)"
            )


def check_model_settings(settings: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Refuse model settings that differ from the run's (they change the parameters'
    shapes or meaning)."""
    recorded = saved["model_spec"].get("settings", {}) or {}
    for key in sorted(set(settings) | set(recorded)):
        if _plain(settings.get(key)) != _plain(recorded.get(key)):
            raise InputError(
                f"--resume: model setting {key}={settings.get(key)!r} differs from the run's "
                f"{recorded.get(key)!r}; model settings cannot change on resume (start a new "
                f"run with --overwrite or another --out)"
            )


def check_model(spec: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Refuse a resume with another model: another zoo name, another file, or the same file
    with other content (its hash)."""
    recorded = saved["model_spec"]
    for key in ("zoo", "file", "name", "sha256"):
        if key in recorded or key in spec:
            if spec.get(key) != recorded.get(key):
                what = "model file content (sha256)" if key == "sha256" else f"model {key}"
                raise InputError(
                    f"--resume: {what} {spec.get(key)!r} differs from the run's "
                    f"{recorded.get(key)!r}; resume with the run's model ({saved['model']!r})"
                )
