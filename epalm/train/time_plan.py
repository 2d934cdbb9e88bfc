"""The time plan of a config on paper: samples/s per GPU and hours per epoch from the FLOP model at a stated MFU and
the chosen engine's communication volume at a stated interconnect bandwidth (docs/training.md, "Time planning").

Every assumption is a named, printed, overridable number; nothing is measured here. tests/gpu/check_train.py
prints this prediction beside each measurement, so a GPU run calibrates the MFU and the bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from epalm.config import Config, gradient_accumulation_steps
from epalm.train.memory_plan import BYTES, count_params

FP32_GRAD = 4  # the DeepSpeed JSONs' communication_data_type: gradients are reduced in fp32


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: dict[str, float]  # dense tensor-core FLOP/s by training precision (fp32 runs on TF32)
    memory_bytes: int
    hbm_bytes_per_s: float  # device memory bandwidth: reading the frozen weights bounds a small micro-batch
    nvlink_gbps: float  # per GPU and direction, inside a node
    network_gbps: float  # per GPU, between nodes (one InfiniBand NIC per GPU)


# Vendors' datasheets (SXM parts, dense, no sparsity): H100 / H200 989 TFLOP/s bf16, HBM 3.35 / 4.8 TB/s, NVLink 4
# at 450 GB/s per direction, NDR 400 Gb/s per GPU; A100 312 TFLOP/s, 2.04 TB/s, NVLink 3 at 300 GB/s, HDR 200 Gb/s.
_HOPPER = {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}  # fp32 runs on TF32
_AMPERE = {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}
GPUS = {
    "h100": GPU("H100 SXM 80GB", _HOPPER, 80 * 10**9, 3.35e12, 3600.0, 400.0),
    "h200": GPU("H200 SXM 141GB", _HOPPER, 141 * 10**9, 4.8e12, 3600.0, 400.0),
    "a100": GPU("A100 SXM 80GB", _AMPERE, 80 * 10**9, 2.04e12, 2400.0, 200.0),
}
GPUS_PER_NODE = 8
DEFAULT_MFU = 0.40
DEFAULT_PCIE_GBPS = 256.0  # host <-> device for offloaded shards (PCIe 5 x16 in practice)


def lm_train_flops(n_lm: int, tokens: int) -> float:
    """Frozen LM, forward (2N) and backward through the activations only (~2N): 4 N per token."""
    return 4.0 * n_lm * tokens


def vit_forward_flops(n_enc: int, depth: int, dim: int, patches: int) -> float:
    """2 N per token over patches + [CLS], plus attention scores and mixing (4 n^2 d per layer)."""
    n = patches + 1
    return 2.0 * n_enc * n + depth * 4.0 * n * n * dim


def encoder_tokens(encoder) -> int:
    """Tokens the frozen encoder runs over per sample, read from the built (meta) model."""
    inner = encoder.model
    if hasattr(inner, "patch_embed"):  # timm ViT
        return inner.patch_embed.num_patches + 1
    c = inner.config
    if hasattr(c, "num_frames"):  # TimeSformer, divided space-time: frames x patches + [CLS]
        return c.num_frames * (c.image_size // c.patch_size) ** 2 + 1
    f = (c.num_mel_bins - c.patch_size) // c.frequency_stride + 1  # AST: overlapping patches + [CLS], distill
    t = (c.max_length - c.patch_size) // c.time_stride + 1
    return f * t + 2


def flop_params(module, skip: str) -> int:
    """The parameters of `module` that cost FLOPs per token: all but those whose name holds `skip` (the position
    table); a tied weight once, a ZeRO-3 partitioned parameter whole."""
    return sum(getattr(p, "ds_numel", p.numel()) for n, p in module.named_parameters() if skip not in n)


def flops_per_sample(model, text_tokens: int) -> tuple[float, float]:
    """(LM forward + backward, encoder forward) FLOPs of one sample of the built (meta or engine's) model."""
    prompt = model.prompt.num_tokens if model.prompt is not None else 0
    lm = lm_train_flops(flop_params(model.lm, "embed_positions"), text_tokens + prompt)
    if model.encoder is None:  # cached features: the encoder ran before training
        return lm, 0.0
    inner = model.encoder.model
    n_enc = flop_params(inner, "pos_embed")
    tokens = encoder_tokens(model.encoder)
    if hasattr(inner, "blocks"):
        return lm, vit_forward_flops(n_enc, len(inner.blocks), inner.embed_dim, tokens - 1)
    return lm, 2.0 * n_enc * tokens  # HF encoders: the matmuls only (attention adds a few percent)


def gathered_elements(model, zero_config: dict) -> tuple[int, int]:
    """(forward, backward) frozen elements ZeRO-3 all-gathers per micro-step: all of them in forward; in
    backward the LM's layers on the gradient path plus its head, less what stays gathered
    (`stage3_max_reuse_distance`). The encoder runs without gradients: forward only."""
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    frozen = sum(p.numel() for p in model.parameters() if id(p) not in trainable)
    decoder = model.lm.model.decoder
    first = min(model.layer_states) if model.prompt is None else 0
    path = sum(p.numel() for layer in decoder.layers[first:] for p in layer.parameters())
    path += model.lm.lm_head.weight.numel()
    kept = int(zero_config.get("stage3_max_reuse_distance", 1_000_000_000))
    return frozen, max(0, path - kept)


@dataclass(frozen=True)
class TimePlan:
    samples_per_s_per_gpu: float
    hours_per_epoch: float
    rows: list[tuple[str, str]]  # (what, value), for printing; assumptions marked

    def last_line(self) -> str:
        return f"samples_per_s_per_gpu={self.samples_per_s_per_gpu:.4g} hours_per_epoch={self.hours_per_epoch:.4g}"


def plan_time(
    cfg: Config, gpus: int, gpu: GPU, engine: str, ds_config: dict, dataset_size: int, *, mfu: float = DEFAULT_MFU,
    interconnect_gbps: float | None = None, pcie_gbps: float = DEFAULT_PCIE_GBPS, precision: str = "bf16",
    text_tokens: int = 32, model=None,
) -> TimePlan:  # fmt: skip
    """Per GPU and optimizer step: compute = accumulation x max(micro x FLOPs / (peak x MFU), the frozen weights
    read from device memory in forward and backward); communication = the bytes each GPU receives at the
    interconnect bandwidth, not overlapped with compute (DeepSpeed overlaps part of it, so this is a lower bound on
    speed); the loader and the optimizer's own arithmetic are left out."""
    from epalm.model.epalm import build_model

    if model is None:
        model = build_model(cfg.model, device="meta", with_encoder=not cfg.data.use_features)
    micro = cfg.train.micro_batch_size
    accum = gradient_accumulation_steps(cfg.train, gpus)
    per_step = micro * accum  # samples per GPU and optimizer step
    lm_f, enc_f = flops_per_sample(model, text_tokens)
    peak = gpu.peak_flops[precision]
    bpe = BYTES[precision]
    read_fwd, read_bwd = gathered_elements(model, {"stage3_max_reuse_distance": 0})
    flops_s = micro * (lm_f + enc_f) / (peak * mfu)
    weights_s = (read_fwd + read_bwd) * bpe / gpu.hbm_bytes_per_s
    compute_s = accum * max(flops_s, weights_s)

    bw_gbps = interconnect_gbps or (gpu.nvlink_gbps if gpus <= GPUS_PER_NODE else gpu.network_gbps)
    link = "NVLink, one node" if gpus <= GPUS_PER_NODE else "network, between nodes"
    bw = bw_gbps * 1e9 / 8  # bytes/s
    ring = (gpus - 1) / gpus  # share of a collective's payload each GPU receives (ring all-gather)
    _, trainable = count_params(model)
    zc = ds_config.get("zero_optimization", {})
    grads = 2 * ring * trainable * FP32_GRAD  # all-reduce (or reduce-scatter + all-gather) once per step
    gather = host = 0.0
    fwd = bwd = 0
    if zc.get("stage", 0) == 3:
        fwd, bwd = gathered_elements(model, zc)
        gather = accum * ring * (fwd + bwd) * bpe
        if zc.get("offload_param", {}).get("device", "none") not in ("none", None):
            host = accum * (fwd + bwd) / gpus * bpe  # each GPU's own shard comes from host memory
    comm_s = (grads + gather) / bw + host / (pcie_gbps * 1e9 / 8)
    step_s = compute_s + comm_s
    sps = per_step / step_s
    hours = dataset_size / (sps * gpus) / 3600
    g = 1e9
    rows = [
        (
            "GPU (assumed, --gpu)",
            f"{gpu.name}, {peak / 1e12:.0f} TFLOP/s {precision}, {gpu.hbm_bytes_per_s / 1e12:g} TB/s",
        ),
        ("MFU (assumed, --mfu)", f"{mfu:.2f}"),
        ("interconnect (assumed, --interconnect-gbps)", f"{bw_gbps:g} Gb/s per GPU ({link})"),
        ("engine", engine),
        ("samples per GPU and optimizer step", f"{micro} micro-batch x {accum} accumulation = {per_step}"),
        (
            "FLOPs per sample: LM forward + backward",
            f"{lm_f / g:,.1f} GFLOP (4 N x {text_tokens} text + prompt tokens)",
        ),
        ("FLOPs per sample: encoder forward", f"{enc_f / g:,.1f} GFLOP"),
        ("micro-step at the MFU", f"{flops_s * 1e3:,.2f} ms"),
        ("micro-step reading the frozen weights (HBM, fwd + bwd)", f"{weights_s * 1e3:,.2f} ms"),
        ("compute per step (the larger, x accumulation)", f"{compute_s * 1e3:,.2f} ms"),
        ("adapter gradients per step (received)", f"{grads / g:,.4f} GB"),
        (
            "ZeRO-3 gathers per step (received)",
            f"{gather / g:,.3f} GB ({fwd:,} fwd + {bwd:,} bwd elements x {accum})",
        ),
    ]
    if host:
        rows.append(
            ("offloaded shards to the GPU per step (PCIe, assumed --pcie-gbps)", f"{host / g:,.3f} GB")
        )
    rows += [
        ("communication per step (not overlapped)", f"{comm_s * 1e3:,.2f} ms"),
        ("step", f"{step_s * 1e3:,.2f} ms"),
        ("dataset", f"{dataset_size:,} samples, {gpus} GPUs"),
    ]
    return TimePlan(sps, hours, rows)
