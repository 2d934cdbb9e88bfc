"""Adapters on the Hugging Face Hub: where an adapter reference (a local directory or `org/name[@revision]`)
lives on disk, the model card a pushed adapter carries, and the upload. All Hub I/O is huggingface_hub's
(`snapshot_download` honours HF_HUB_OFFLINE and the cache; `HfApi.upload_folder` pushes; `ModelCardData`
writes the card's YAML), so nothing here knows the cache layout or the Hub's HTTP API."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from epalm.config import Config
from epalm.data.schema import MANIFEST
from epalm.locations import looks_local
from epalm.run import layout

log = logging.getLogger(__name__)

CITATION = """@article{shukor2023ep,
  title={eP-ALM: Efficient Perceptual Augmentation of Language Models},
  author={Shukor, Mustafa and Dancette, Corentin and Cord, Matthieu},
  journal={arXiv preprint arXiv:2303.11403},
  year={2023}
}"""  # as the original README (github.com/mshukor/eP-ALM) gives it
# the Hub's task names for what an adapter does (its pipeline tag and the model-index task type)
HUB_TASKS = {
    ("qa", "image"): "visual-question-answering",
    ("caption", "image"): "image-to-text",
    ("qa", "video"): "video-text-to-text",
    ("caption", "video"): "video-text-to-text",
    ("qa", "audio"): "audio-text-to-text",
    ("caption", "audio"): "audio-text-to-text",
}


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) of `org/name` or `org/name@revision`; None for anything else (a path, a name)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, revision = ref.partition("@")
    if repo_id.count("/") != 1 or looks_local(repo_id):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def resolve_adapter(ref: str | Path) -> Path:
    """The local directory of an adapter: `ref` itself when it is a directory, else the snapshot of the Hub
    repo `org/name[@revision]` (downloaded into huggingface_hub's cache; HF_HUB_OFFLINE=1: the cached one).
    Raises FileNotFoundError naming `ref` when neither exists."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    hub = parse_hub_id(str(ref))
    if hub is None:
        raise FileNotFoundError(f"{ref}: no such adapter directory (nor a Hub id org/name[@revision])")
    from huggingface_hub import snapshot_download

    repo_id, revision = hub
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except OSError as e:  # not cached while offline, unknown repo or revision, no connection
        raise FileNotFoundError(f"{ref}: not a local directory, and the Hub repo cannot be had: {e}") from e


# --------------------------------------------------------------------------- the model card


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def base_models(cfg: Config) -> list[str]:
    """The Hub ids of the frozen models the adapter sits on (random-weight and local ones have none)."""
    m, ids = cfg.model, []
    if m.lm.pretrained and not looks_local(m.lm.name) and "/" in m.lm.name:
        ids.append(m.lm.name)
    enc = m.encoder
    if enc.pretrained and not enc.checkpoint:
        if enc.kind == "vit":
            ids.append(f"timm/{enc.name}")  # timm's pretrained weights live under the `timm` org
        elif not looks_local(enc.name):
            ids.append(enc.name)
    return ids


def shard_label(path: str | None) -> str:
    """A shard directory as a dataset name: its manifest's `source/split` when readable, else its last two
    path parts (shards/vqav2/karpathy_val -> vqav2/karpathy_val)."""
    if not path:
        return "unknown"
    manifest = _read_json(Path(path) / MANIFEST) if looks_local(path) else {}
    if manifest.get("source"):
        return "/".join(str(manifest[k]) for k in ("source", "split") if manifest.get(k))
    return "/".join(Path(path).parts[-2:])


def run_results(run_dir: Path, cfg: Config) -> list[dict]:
    """The run's numbers, from its own files: each val metric's best (best.json) and last value and the last
    val loss (metrics.jsonl), and the final test evaluation (eval/scores.json)."""
    from epalm.evaluation.report import eval_metrics, read_jsonl, series

    records = read_jsonl(run_dir / layout.METRICS)
    best = _read_json(run_dir / layout.BEST_RECORD)
    val, results = shard_label(cfg.data.val), []
    for metric in [*eval_metrics(records), "loss"]:
        steps, values = series(records, f"val/{metric}")
        if best.get("metric") == metric:
            results.append(
                dict(metric=metric, split="val", value=best["value"], at=f"best, step {best['step']}")
            )
        if steps:
            results.append(dict(metric=metric, split="val", value=values[-1], at=f"last, step {steps[-1]}"))
    for r in results:
        r["dataset"] = val
    scores = _read_json(run_dir / layout.EVAL / layout.SCORES)
    for key, value in (scores.get("headline") or {}).items():
        metric = key.split("/", 1)[-1]
        results.append(
            dict(
                metric=metric,
                split="test",
                value=value,
                at="final",
                dataset=shard_label(scores.get("shards")),
            )
        )
    return results


def dataset_names(cfg: Config) -> list[str]:
    """The training shards' `source` names (their manifest.json), where the shards are readable from here."""
    names = []
    for ds in cfg.data.train:
        manifest = _read_json(Path(ds.path) / MANIFEST) if looks_local(ds.path) else {}
        if manifest.get("source"):
            names.append(manifest["source"])
    return sorted(set(names))


def parameter_counts(state: dict, cfg: Config) -> tuple[int, int | None]:
    """(trainable, total): the export's tensors, and the whole model built on the meta device (None if the
    LM's architecture is not known offline)."""
    from epalm.model.epalm import build_model

    trainable = sum(t.numel() for t in state.values())
    try:
        model = build_model(cfg.model, device="meta")
    except (OSError, ValueError) as e:
        log.warning("total parameters unknown: %s", e)
        return trainable, None
    return trainable, sum(p.numel() for p in model.parameters())


def build_model_card(state: dict, cfg: Config, repo_id: str, run_dir: str | Path | None = None) -> str:
    """README.md for the Hub of the adapter (`state`, `cfg`: `load_adapter`'s): YAML metadata (library, tags,
    base models, datasets, model-index results from `run_dir`'s files) and a body with parameter counts, the
    results, usage and the paper's citation."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    task, modality = cfg.data.task, cfg.data.modality
    hub_task = HUB_TASKS[(task, modality)]
    results = run_results(Path(run_dir), cfg) if run_dir else []
    datasets = dataset_names(cfg)
    evals = [
        EvalResult(
            task_type=hub_task,
            dataset_type=r["dataset"],
            dataset_name=r["dataset"],
            dataset_split=r["split"],
            metric_type=r["metric"],
            metric_name=f"{r['metric']} ({r['at']})",
            metric_value=float(r["value"]),
        )
        for r in results
    ]
    data = ModelCardData(
        library_name="epalm",
        pipeline_tag=hub_task,
        tags=["eP-ALM", "adapter", "multimodal", modality, task, "opt"],
        base_model=base_models(cfg) or None,
        datasets=datasets or None,
        model_name=repo_id,
        eval_results=evals or None,
    )
    trainable, total = parameter_counts(state, cfg)
    share = f" of {total:,} ({100 * trainable / total:.3f}%)" if total else ""
    enc, lm, a = cfg.model.encoder, cfg.model.lm, cfg.model.adapter
    lines = [
        f"# {repo_id}",
        "",
        f"An eP-ALM adapter ({task}, {modality}): a frozen OPT (`{lm.name}`) and a frozen {enc.kind} encoder "
        f"(`{enc.name}`), joined by a trained linear connection into LM layers "
        f"{a.start_layer}..{a.end_layer - 1} and a {a.prompt_tokens}-token soft prompt "
        "([paper](https://arxiv.org/abs/2303.11403)).",
        "",
        f"- trainable parameters: {trainable:,}{share}",
        f"- files: `{layout.ADAPTER_WEIGHTS}` (the trained weights), `{layout.CONFIG}` (model and decoding "
        f"settings), `{layout.FROZEN}/` (small frozen parts copied in, if any)",
        "",
        "## Results",
        "",
    ]
    if results:
        lines += ["| metric | data | value | when |", "|---|---|---|---|"]
        lines += [f"| {r['metric']} | {r['dataset']} | {r['value']:.4g} | {r['at']} |" for r in results]
        lines += [
            "",
            "Accuracy in percent; CIDEr, BLEU-4 and METEOR x100. From the training run's own files.",
        ]
    else:
        lines.append("No training run was given (`--run-dir`), so no numbers are listed.")
    flag = " --question 'what is this?'" if task == "qa" else ""
    lines += [
        "",
        "## Usage",
        "",
        "```bash",
        f"python -m epalm.cli.generate --adapter {repo_id} --{modality} FILE{flag}",
        "```",
        "",
        "```python",
        "from epalm.api import Predictor",
        f'predictor = Predictor.load("{repo_id}")  # or "{repo_id}@<revision>"; offline: HF_HUB_OFFLINE=1',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").content


def upload_adapter(folder: str | Path, repo_id: str, *, revision: str = "main", private: bool = False) -> str:
    """Create `repo_id` if needed (and the branch `revision`), upload `folder` as one commit; its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message="Upload eP-ALM adapter"
    )
    return str(commit)
