"""Everything that can be checked before a model is built, reported in one `ConfigError`.

`epalm.config` checks a config against itself; this module adds what needs more: the LM's depth
(from the architecture table or a local config.json) and the files a run will open (shard manifests,
tokenizer, LM and encoder checkpoints, an initial adapter: a directory or a Hub id). Launchers call
`load_run_config`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from epalm.config import Check, Config, build_config, load_config
from epalm.locations import is_remote, looks_local
from epalm.model.injection import schedule_problems
from epalm.model.language_model import find_lm_config
from epalm.run.hub import resolve_adapter
from epalm.run.layout import ADAPTER_WEIGHTS


def model_problems(cfg: Config, ok: Callable[..., bool]) -> list[str]:
    """The injection schedule against the LM's depth (known offline for table keys and local dirs)."""
    m = cfg.model
    if not ok("model.adapter.start_layer", "model.adapter.end_layer", "model.encoder.num_states", "model.lm"):
        return []
    try:
        lm_config = find_lm_config(m.lm)
    except (OSError, ValueError, TypeError) as e:
        return [f"model.lm: cannot read the LM's config.json: {e}"]
    num_layers = lm_config.num_hidden_layers if lm_config is not None else None
    return schedule_problems(m.adapter.start_layer, m.adapter.end_layer, m.encoder.num_states, num_layers)


def _shard_problem(key: str, path: str) -> str | None:
    from epalm.data.stream import load_manifest

    if is_remote(path):
        return None
    try:
        load_manifest(path)
    except FileNotFoundError:
        where = "directory not found" if not Path(path).is_dir() else "no manifest.json in it"
        return f"{key}: shard {where}: {path}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{key}: unreadable shard manifest in {path}: {e}"
    return None


def _init_adapter_problem(ref: str) -> str | None:
    """A local adapter directory, or a Hub id fetched (or, offline, found in the cache) as training will."""
    try:
        path = resolve_adapter(ref)
    except FileNotFoundError as e:
        return f"train.init_adapter: {e}"
    if not (path / ADAPTER_WEIGHTS).is_file():
        return f"train.init_adapter: no {ADAPTER_WEIGHTS} in {ref}"
    return None


def path_problems(cfg: Config, ok: Callable[..., bool]) -> list[str]:
    """Every local file or directory the run will open, checked to exist (remote shards excepted)."""
    problems: list[str] = []
    d, m = cfg.data, cfg.model
    if ok("data.train"):
        for i, ds in enumerate(d.train):
            problems.append(_shard_problem(f"data.train[{i}].path", ds.path))
    if ok("data.val") and d.val:
        problems.append(_shard_problem("data.val", d.val))
    if ok("data.test", "data.task") and d.test and d.task == "caption":  # only captioning runs read it
        problems.append(_shard_problem("data.test", d.test))
    if ok("model.lm"):
        tokenizer = m.lm.tokenizer or m.lm.name
        if looks_local(tokenizer) and not Path(tokenizer).expanduser().is_dir():
            problems.append(f"model.lm.tokenizer: tokenizer directory not found: {tokenizer}")
        if m.lm.pretrained and looks_local(m.lm.name) and not (Path(m.lm.name) / "config.json").is_file():
            problems.append(f"model.lm.name: no LM checkpoint directory (with config.json) at {m.lm.name}")
    if ok("model.encoder"):
        enc = m.encoder
        if enc.checkpoint and not Path(enc.checkpoint).is_file():
            problems.append(f"model.encoder.checkpoint: file not found: {enc.checkpoint}")
        if enc.kind != "vit" and enc.pretrained and looks_local(enc.name) and not Path(enc.name).is_dir():
            problems.append(f"model.encoder.name: encoder directory not found: {enc.name}")
    if ok("train.init_adapter") and cfg.train.init_adapter:
        problems.append(_init_adapter_problem(cfg.train.init_adapter))
    return [p for p in problems if p]


def run_checks(paths: bool) -> list[Check]:
    return [model_problems, path_problems] if paths else [model_problems]


def load_run_config(path: str | Path, overrides: Sequence[str] = (), *, paths: bool = True) -> Config:
    """`load_config` plus the LM-depth check and (with `paths`) the filesystem checks, in one error."""
    return load_config(path, overrides, checks=run_checks(paths))


def build_run_config(tree: dict, overrides: Sequence[str] = (), *, paths: bool = False) -> Config:
    """`build_config` with this module's checks (tests and tools that build configs from mappings)."""
    return build_config(tree, overrides, checks=run_checks(paths))
