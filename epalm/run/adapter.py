"""The adapter export: trainable weights only, as safetensors beside the resolved config, written atomically
with the umask's permissions. Portable: hub ids stay hub ids and small local frozen parts (a tokenizer, a
tiny encoder) are copied in and named relative to the export. `load_adapter` reads one from a directory or
the Hub."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from epalm.config import Config, build_config, read_config_tree, save_config
from epalm.run.hub import resolve_adapter
from epalm.run.layout import ADAPTER_WEIGHTS, FROZEN
from epalm.run.layout import CONFIG as ADAPTER_CONFIG

log = logging.getLogger(__name__)

PORTABLE_MAX_BYTES = 50 * 2**20  # local frozen parts up to 50 MiB are copied into the export
# the frozen parts an adapter needs, as (section, field) of `model`; the name each copy gets under FROZEN/
FROZEN_PARTS = {
    ("lm", "name"): "lm",
    ("lm", "tokenizer"): "tokenizer",
    ("encoder", "name"): "encoder",
    ("encoder", "checkpoint"): "encoder_checkpoint",
}
_warned: set[Path] = set()  # large local parts already reported


def save_adapter(state: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path) -> Path:
    """Write `out_dir/{adapter.safetensors, config.yaml, frozen/}`; a crash mid-write keeps the old export.

    The export is portable (`portable_config`): local frozen parts of at most PORTABLE_MAX_BYTES (50 MiB) are
    copied under `frozen/` and named `./frozen/<part>`; larger ones keep their absolute path, with a warning.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        save_config(portable_config(absolute_paths(cfg), tmp), tmp / ADAPTER_CONFIG)
        _apply_umask(tmp)  # mkdtemp makes 0700 and safetensors 0600: colleagues must be able to read it
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with every relative path that exists from here made absolute, so the export works from anywhere.
    Data shards and run_dir stay in the export as information only: using an adapter never reads them."""

    def fix(value: str | None) -> str | None:
        if not value or Path(value).is_absolute() or not Path(value).exists():
            return value  # also hub ids and architecture keys ("facebook/opt-2.7b", "125m")
        return str(Path(value).resolve())

    m, d, t = cfg.model, cfg.data, cfg.train
    lm = dataclasses.replace(m.lm, name=fix(m.lm.name), tokenizer=fix(m.lm.tokenizer))
    enc = dataclasses.replace(m.encoder, name=fix(m.encoder.name), checkpoint=fix(m.encoder.checkpoint))
    data = dataclasses.replace(
        d,
        train=[dataclasses.replace(x, path=fix(x.path)) for x in d.train],
        val=fix(d.val),
        test=fix(d.test),
    )
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(m, lm=lm, encoder=enc),
        data=data,
        train=dataclasses.replace(t, init_adapter=fix(t.init_adapter)),
        run_dir=fix(cfg.run_dir),
    )


def _local_part(cfg: Config, section: str, field: str) -> Path | None:
    value = getattr(getattr(cfg.model, section), field)
    if not value or (section, field) == ("encoder", "name") and cfg.model.encoder.kind == "vit":
        return None  # a ViT's name is a timm architecture name, never a path
    path = Path(value).expanduser()
    return path if path.is_absolute() and path.exists() else None


def _size(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def portable_config(cfg: Config, export_dir: Path) -> Config:
    """`cfg` (paths already absolute) with its small local frozen parts copied into `export_dir/frozen/` and
    named `./frozen/<part>[/<file name>]`, relative to the export; the same source is copied once."""
    copied: dict[Path, str] = {}
    changes: dict[str, dict[str, str]] = {"lm": {}, "encoder": {}}
    for (section, field), part in FROZEN_PARTS.items():
        source = _local_part(cfg, section, field)
        if source is None:
            continue
        source = source.resolve()
        if source not in copied:
            size = _size(source)
            if size > PORTABLE_MAX_BYTES:
                if source not in _warned:  # once per process, not at every checkpoint
                    _warned.add(source)
                    log.warning(
                        "model.%s.%s: %s is %.1f MiB, over the %.1f MiB copied into an adapter export: the "
                        "export names it by its absolute path and does not load on a machine without it",
                        section, field, source, size / 2**20, PORTABLE_MAX_BYTES / 2**20,
                    )  # fmt: skip
                continue
            target = export_dir / FROZEN / part
            if source.is_dir():
                shutil.copytree(source, target)
                copied[source] = f"./{FROZEN}/{part}"
            else:
                target.mkdir(parents=True)
                shutil.copy2(source, target / source.name)  # the suffix tells timm the format
                copied[source] = f"./{FROZEN}/{part}/{source.name}"
        changes[section][field] = copied[source]
    m = cfg.model
    model = dataclasses.replace(
        m,
        lm=dataclasses.replace(m.lm, **changes["lm"]),
        encoder=dataclasses.replace(m.encoder, **changes["encoder"]),
    )
    return dataclasses.replace(cfg, model=model)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def load_adapter(ref: str | Path, overrides: list[str] = ()) -> tuple[dict[str, torch.Tensor], Config]:
    """Read an adapter export: a local directory or a Hub repo `org/name[@revision]` (`resolve_adapter`).
    Returns (state dict, its config with the `./frozen/...` names made absolute and `overrides` applied)."""
    from safetensors.torch import load_file

    path = resolve_adapter(ref)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{ref}: no {ADAPTER_WEIGHTS}; not an adapter export directory")
    tree = read_config_tree(path / ADAPTER_CONFIG)
    model = tree.get("model") or {}
    for section, field in FROZEN_PARTS:
        part = model.get(section) or {}
        value = part.get(field)
        if isinstance(value, str) and value.startswith(f"./{FROZEN}/"):  # relative to the export, not the cwd
            part[field] = str(path.resolve() / value)
    return load_file(str(weights)), build_config(tree, overrides, source=str(path / ADAPTER_CONFIG))
