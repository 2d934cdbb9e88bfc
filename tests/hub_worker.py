"""One rank of tests/test_hub_formats.py (started by torchrun): for each hub-layout LM directory, build the
engine through `epalm.train.engine.build_engine` under ZeRO-3 bf16 with `model.lm.pretrained=true`, record the
frozen bytes this rank holds right after loading and after `deepspeed.initialize`, train two steps, then
gather every frozen tensor and compare it with the checkpoint's, cast to bf16. Writes OUT/rank{r}.json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def resident_bytes(module) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the full tensors) over a module's distinct parameters."""
    held = full = 0
    for p in module.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        held += t.numel() * t.element_size()
        full += numel * t.element_size()
    return held, full


def mismatches(module, saved: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[list[str], int]:
    """Names whose gathered value differs from the saved tensor cast to `dtype`; and how many were compared."""
    import deepspeed

    bad, compared = [], 0
    for name, p in module.named_parameters():
        if name not in saved:
            bad.append(f"{name}: not in the checkpoint")
            continue
        params = [p] if hasattr(p, "ds_id") else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            value = p.detach().cpu()
            want = saved[name].to(dtype)
            if value.dtype != dtype or value.shape != want.shape or not torch.equal(value, want):
                bad.append(f"{name}: {value.dtype}{tuple(value.shape)} differs from the checkpoint")
        compared += 1
    return bad, compared


def run_layout(lm_dir: Path, vit_file: Path, world: int, rank: int) -> dict:
    import epalm.train.engine as engine_mod
    from epalm.config import build_config
    from epalm.train.ds_config import build_ds_config, load_ds_config
    from epalm.train.engine import build_engine
    from epalm.train.memory_plan import plan_memory
    from testing.support import tiny_tree
    from tests.hub_fixtures import read_checkpoint

    tree = tiny_tree()
    tree["model"]["lm"] = {"name": str(lm_dir), "pretrained": True}
    tree["model"]["encoder"].update(pretrained=True, checkpoint=str(vit_file))
    tree["train"] = dict(global_batch_size=2 * world, micro_batch_size=2, max_steps=2, optimizer="torch")
    cfg = build_config(tree)
    ds_config = build_ds_config(load_ds_config(ROOT / "ds_configs" / "zero3.json"), cfg.train, world, "bf16")

    at_load = {}
    original = engine_mod.build_model

    def recording_build_model(*args, **kwargs):
        model = original(*args, **kwargs)
        at_load["lm"] = resident_bytes(model.lm)
        at_load["lm_partitioned"] = all(hasattr(p, "ds_id") for p in model.lm.parameters())
        return model

    engine_mod.build_model = recording_build_model
    try:
        eng = build_engine(cfg, ds_config, total_steps=2)
    finally:
        engine_mod.build_model = original
    model = eng.model
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    frozen_held = frozen_full = 0
    for p in model.parameters():
        if id(p) not in trainable:
            t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            frozen_held += t.numel() * t.element_size()
            frozen_full += getattr(p, "ds_numel", p.numel()) * t.element_size()
    n_frozen_tensors = sum(1 for p in model.parameters() if id(p) not in trainable)

    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(4, 300, (2, 12), generator=g)
    batch = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=ids.clone(),
        media=torch.randn(2, 3, 16, 16),
    )
    eng.ds_engine.train()
    losses = []
    for _ in range(2):
        out = eng.ds_engine(**batch)
        eng.ds_engine.backward(out.loss)
        eng.ds_engine.step()
        losses.append(float(out.loss.detach().float()))

    from safetensors.torch import load_file

    lm_bad, lm_n = mismatches(model.lm, read_checkpoint(lm_dir), torch.bfloat16)
    enc_bad, enc_n = mismatches(model.encoder.model, load_file(vit_file), torch.bfloat16)
    plan = plan_memory(cfg, gpus=world, zero=3, micro_batch=2, precision="bf16")
    return {
        "lm_dir": str(lm_dir),
        "lm_held_at_load": at_load["lm"][0],
        "lm_full_bytes": at_load["lm"][1],
        "lm_partitioned_at_load": at_load["lm_partitioned"],
        "frozen_held_after_init": frozen_held,
        "frozen_full_bytes": frozen_full,
        "frozen_tensors": n_frozen_tensors,
        "planned_frozen_bytes_per_gpu": plan.frozen_bytes_per_gpu,
        "lm_head_tied": model.lm.lm_head.weight is model.lm.get_input_embeddings().weight,
        "lm_mismatches": lm_bad,
        "lm_compared": lm_n,
        "encoder_mismatches": enc_bad,
        "encoder_compared": enc_n,
        "losses": losses,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--vit", required=True)
    p.add_argument("lm_dirs", nargs="+")
    args = p.parse_args()
    from epalm.distributed import init_distributed

    info = init_distributed()
    results = [run_layout(Path(d), Path(args.vit), info.world_size, info.rank) for d in args.lm_dirs]
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    from epalm.distributed import exit_process, shutdown_distributed

    main()
    shutdown_distributed()
    exit_process(0)
