"""Per-GPU memory plan of a config before any GPU is touched: frozen weights (from the meta-device model),
trainable state (parameters, gradients, fp32 masters, Adam moments) and the activations a micro-batch stores.

DeepSpeed's `estimate_zero3_model_states_mem_needs_all_live` was considered: it counts every parameter as
trainable (16-18 bytes each), which for a frozen 6.7B LM overstates the model states ~8x, and it has no
activation model. The activation model is written down in docs/training.md ("Memory planning").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from epalm.config import Config

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4


@dataclass(frozen=True)
class MemoryPlan:
    frozen_params: int
    trainable_params: int
    frozen_bytes_per_gpu: int
    trainable_bytes_per_gpu: int
    activation_bytes_per_gpu: int
    rows: list[tuple[str, int]] = field(default_factory=list)  # (what, bytes per GPU), for printing
    gathered_bytes_per_gpu: int = 0  # ZeRO-3: frozen weights gathered whole while layers run (live budget)

    @property
    def total_bytes_per_gpu(self) -> int:
        """The three resident parts (weights, trainable state, activations)."""
        return self.frozen_bytes_per_gpu + self.trainable_bytes_per_gpu + self.activation_bytes_per_gpu

    @property
    def planned_bytes_per_gpu(self) -> int:
        """What must fit on the device: the three parts plus ZeRO-3's gathered working set."""
        return self.total_bytes_per_gpu + self.gathered_bytes_per_gpu

    def last_line(self) -> str:
        return (
            f"frozen_bytes_per_gpu={self.frozen_bytes_per_gpu} "
            f"trainable_bytes_per_gpu={self.trainable_bytes_per_gpu} "
            f"activation_bytes_per_gpu={self.activation_bytes_per_gpu}"
        )


def count_params(model) -> tuple[int, int]:
    """(frozen, trainable) distinct parameters; a tied LM head counts once, as `parameters()` lists it."""
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    frozen = sum(p.numel() for p in model.parameters() if id(p) not in trainable)
    return frozen, sum(p.numel() for p in model.parameters() if id(p) in trainable)


def trainable_state_bytes(n: int, gpus: int, zero: int, precision: str) -> list[tuple[str, int]]:
    """Adam in mixed precision: low-precision params + grads, fp32 masters + 2 moments (fp32 runs: no masters).

    ZeRO-1 partitions the optimizer state (masters, moments), ZeRO-2 also the gradients, ZeRO-3 also the params.
    """
    bpe = BYTES[precision]

    def part(count_bytes: int, sharded: bool) -> int:
        return math.ceil(count_bytes / gpus) if sharded else count_bytes

    rows = [
        ("trainable params", part(n * bpe, zero >= 3)),
        ("gradients", part(n * bpe, zero >= 2)),
        ("Adam moments (fp32 m, v)", part(2 * n * FP32, zero >= 1)),
    ]
    if precision != "fp32":
        rows.append(("fp32 master params", part(n * FP32, zero >= 1)))
    return rows


def lm_activation_bytes(cfg: Config, lm_config, micro_batch: int, text_tokens: int, precision: str) -> list:
    """Bytes the frozen LM keeps for backward, and its head's working set, for one micro-batch.

    The LM's weights are frozen, so its linear layers keep no inputs (a weight gradient would need them);
    gradients must still flow from the loss down to the lowest trainable input: the soft prompt at layer 0,
    else the first injected token at `start_layer`. Every layer on that path keeps, per token, the inputs
    of its two LayerNorms, q/k/v and the attention output, and the ReLU output (its backward mask):
    (6 H + F) x bytes, plus fp32 LayerNorm statistics and the attention log-sum-exp.
    """
    bpe = BYTES[precision]
    a = cfg.model.adapter
    h, f, heads = lm_config.hidden_size, lm_config.ffn_dim, lm_config.num_attention_heads
    b, prompt = micro_batch, a.prompt_tokens
    first = 0 if prompt > 0 else a.start_layer
    stored = 0
    for layer in range(first, lm_config.num_hidden_layers):
        length = prompt + text_tokens + (1 if layer >= a.start_layer else 0)
        per_token = (6 * h + f) * bpe + 4 * FP32 + heads * FP32
        if cfg.model.lm.attn_implementation == "eager":  # softmax probabilities are kept too
            per_token += heads * length * bpe
        stored += b * length * per_token
    vocab = lm_config.vocab_size
    # logits (kept in the output), their fp32 copy for the loss, and log-softmax's fp32 output for backward
    head = b * text_tokens * vocab * (bpe + FP32 + FP32)
    return [("LM activations kept for backward", stored), ("LM head logits + fp32 loss", head)]


# DeepSpeed's own default for stage3_max_live_parameters (runtime/zero/config.py), used when a plan names none
DS_MAX_LIVE_PARAMETERS = 1_000_000_000


def plan_memory(
    cfg: Config, gpus: int, zero: int, micro_batch: int | None = None, precision: str = "bf16",
    text_tokens: int = 32, *, zero_config: dict | None = None, model=None,
) -> MemoryPlan:  # fmt: skip
    """The per-GPU plan for `cfg` on `gpus` GPUs at ZeRO stage `zero` (frozen weights in `precision`).

    `zero_config` (a DeepSpeed JSON's `zero_optimization`) refines ZeRO-3: `offload_param` keeps the frozen
    shards in host memory, and `stage3_max_live_parameters` bounds the gathered working set (DeepSpeed's
    coordinator keeps a gathered parameter until it is `stage3_max_reuse_distance` elements from its next use and
    prefetches only under that many live elements; at least one layer is always whole). `model`: the meta-device
    model, when the caller already built it (several plans of one config).
    """
    from epalm.model.epalm import build_model

    if gpus < 1 or zero not in (0, 1, 2, 3) or precision not in BYTES:
        raise ValueError(f"need gpus >= 1, zero in 0..3 and precision in {sorted(BYTES)}")
    micro = micro_batch or cfg.train.micro_batch_size
    if model is None:
        model = build_model(cfg.model, device="meta", with_encoder=not cfg.data.use_features)
    frozen, trainable = count_params(model)
    bpe = BYTES[precision]
    zc = zero_config or {}
    offload = zero == 3 and zc.get("offload_param", {}).get("device", "none") not in ("none", None)
    frozen_bytes = 0 if offload else math.ceil(frozen / gpus) * bpe if zero == 3 else frozen * bpe
    where = "in host memory (offload_param)" if offload else precision
    rows = [(f"frozen weights ({frozen:,} params, {where})", frozen_bytes)]
    state = trainable_state_bytes(trainable, gpus, zero, precision)
    acts = lm_activation_bytes(cfg, model.lm.config, micro, text_tokens, precision)
    rows += state + acts
    gathered = 0
    if zero == 3:
        layer = sum(q.numel() for q in model.lm.model.decoder.layers[0].parameters())
        live = int(zc.get("stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS))
        gathered = min(frozen, max(live, layer)) * bpe
        rows.append(
            (f"ZeRO-3 gathered working set (<= {min(frozen, max(live, layer)):,} elements)", gathered)
        )
    return MemoryPlan(
        frozen_params=frozen,
        trainable_params=trainable,
        frozen_bytes_per_gpu=frozen_bytes,
        trainable_bytes_per_gpu=sum(n for _, n in state),
        activation_bytes_per_gpu=sum(n for _, n in acts),
        rows=rows,
        gathered_bytes_per_gpu=gathered,
    )
