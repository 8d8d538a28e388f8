"""The PyTorch reference: the same train steps built from ``transformers`` BEiT / CLIP / ViT layers."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from beitv2_jax.bench.workloads import Workload

# ----------------------------------------------------------------------------------------------- PyTorch mirror
def torch_problem() -> Optional[str]:
    """Why the PyTorch mirror cannot run here (None when it can): it needs torch and transformers ≥ 5 (whose BEiT
    layers take the position bias as ``attention_mask`` and live in ``BeitModel.layers``)."""
    try:
        import torch  # noqa: F401

        from beitv2_jax.torch_compat import import_torchvision_on_cpu_torch

        import_torchvision_on_cpu_torch()  # transformers imports torchvision when it is installed
        import transformers
    except ImportError as e:
        return f"torch/transformers not installed ({e})"
    if int(transformers.__version__.split(".")[0]) < 5:
        return f"the PyTorch mirror needs transformers>=5, found {transformers.__version__}"
    return None


TORCH_COMPILE_MODES = ("max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead", "default")


def torch_settings(device: str, compile_mode: str = "max-autotune") -> dict:
    """The PyTorch settings the comparison runs with, pinned (and printed) rather than left to defaults:

    * ``autocast``: bf16 autocast on CUDA (as our ``dtype=bfloat16``), fp32 on CPU (as the demo);
    * ``sdpa_backends``: on CUDA only the fused ``scaled_dot_product_attention`` kernels (cuDNN, memory-efficient,
      flash; the math fallback is excluded, so a shape they refuse fails loudly); on CPU torch's own choice;
    * ``channels_last``: the NCHW image batch and the patch-embedding conv in channels-last on CUDA;
    * ``compile_mode``: ``torch.compile(mode=...)`` (``max-autotune``: inductor autotunes matmuls/convs, CUDA graphs);
    * ``optimizer``: AdamW ``fused`` on CUDA, ``foreach`` on CPU; ``tf32``: TF32 matmuls allowed for the fp32
      leftovers on CUDA (``set_float32_matmul_precision('high')``; ours keeps those in fp32 or HIGHEST).
    """
    if compile_mode not in TORCH_COMPILE_MODES:
        raise ValueError(f"torch compile mode must be one of {TORCH_COMPILE_MODES}, got {compile_mode!r}")
    cuda = device == "cuda"
    return {"autocast": "bfloat16" if cuda else "off (float32)",
            "sdpa_backends": ["CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "FLASH_ATTENTION"] if cuda else "torch default",
            "channels_last": cuda, "compile_mode": compile_mode, "optimizer": "AdamW fused" if cuda else
            "AdamW foreach", "float32_matmul_precision": "high" if cuda else "highest"}


class TorchRunner:
    """The same train step in PyTorch (``torch_train_step``) under ``torch_settings``, stepped in timed windows."""

    def __init__(self, work: Workload, device: str, compile_model: bool, threads: int = 0,
                 compile_mode: str = "max-autotune"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.settings = torch_settings(device, compile_mode)
        self.amp = self.settings["autocast"] == "bfloat16"
        torch.set_float32_matmul_precision(self.settings["float32_matmul_precision"])
        self.step_fn, self.num_params = torch_train_step(work.task, work.arch, work.batch, device, self.amp,
                                                      compile_model, self.settings)
        self.compile_s = 0.0
        t0 = time.perf_counter()
        self.run(2)  # warm-up; with torch.compile this triggers compilation (forward and backward)
        self.compile_s = time.perf_counter() - t0

    def run(self, steps: int) -> float:
        torch = self.torch
        if self.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step_fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        else:
            float(loss)
        return time.perf_counter() - t0


def _beit_config(**kw):
    from transformers import BeitConfig

    base = dict(hidden_act="gelu", layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                drop_path_rate=0.0, use_mask_token=False, use_absolute_position_embeddings=False,
                use_relative_position_bias=False, use_shared_relative_position_bias=False, layer_scale_init_value=0.0,
                use_mean_pooling=False)
    base.update(kw)
    config = BeitConfig(**base)
    config._attn_implementation = "sdpa"  # torch.nn.functional.scaled_dot_product_attention, bias as attn_mask
    return config


def _torch_vit_trunk(width, depth, heads, image_size, patch_size, channels=3, mlp_ratio=4.0, **kw):
    """A transformers ``BeitModel`` used as a plain block stack (no final norm, no pooler)."""
    import torch.nn as nn
    from transformers.models.beit.modeling_beit import BeitModel

    cfg = _beit_config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                       intermediate_size=int(width * mlp_ratio), image_size=image_size, patch_size=patch_size,
                       num_channels=channels, **kw)
    model = BeitModel(cfg, add_pooling_layer=False)
    model.layernorm = nn.Identity()
    return model, cfg


def _torch_modules():
    """PyTorch mirrors of our models, built from transformers' BEiT / CLIP / ViT layers (defined lazily so the
    module imports without torch)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers.models.beit.modeling_beit import BeitLayer

    def run_blocks(trunk, x, resolution, bias=None, keep=None):
        kept = None
        for i, layer in enumerate(trunk.layers):
            x = layer(x, attention_mask=bias, resolution=resolution)
            if keep is not None and i + 1 == keep:
                kept = x
        return x, kept

    class Tokenizer(nn.Module):
        """VQ-KD encoder → task layer → l2-normalised codes → nearest unit-norm code (forward only)."""

        def __init__(self, t: dict):
            super().__init__()
            extra = dict(t["extra"])
            self.trunk, _ = _torch_vit_trunk(t["width"], t["depth"], t["num_heads"], t["image_size"], t["patch_size"],
                                             use_absolute_position_embeddings=True)
            self.fc_norm = nn.LayerNorm(t["width"], eps=1e-6)
            self.task = nn.Sequential(nn.Linear(t["width"], t["width"]), nn.Tanh(),
                                      nn.Linear(t["width"], extra["code_dim"]))
            self.register_buffer("codebook", F.normalize(torch.randn(extra["num_codes"], extra["code_dim"]), dim=-1))

        def forward(self, images):  # images NCHW in [0, 1]
            x = self.trunk.embeddings(images * 2.0 - 1.0)
            x, _ = run_blocks(self.trunk, x, images.shape[2:])
            with torch.autocast(images.device.type, enabled=False):
                z = F.normalize(self.task(self.fc_norm(x[:, 1:]).float()), dim=-1)
                cb = self.codebook
                dist = z.pow(2).sum(-1, keepdim=True) + cb.pow(2).sum(-1) - 2.0 * z @ cb.t()
            return dist.argmin(-1)  # [B, N]

    class Pretrain(nn.Module):
        """BEiT v2 MIM model (official ``VisionTransformerForMaskedImageModelingCLS``) on transformers' BEiT."""

        def __init__(self, a: dict):
            super().__init__()
            self.early = a["early_layers"]
            self.trunk, cfg = _torch_vit_trunk(a["width"], a["depth"], a["num_heads"], a["image_size"],
                                               a["patch_size"], mlp_ratio=a["mlp_ratio"], use_mask_token=True,
                                               use_shared_relative_position_bias=True,
                                               layer_scale_init_value=a["layer_scale_init"])
            # BeitLayer reads only use_relative_position_bias (False): the head blocks get the shared bias passed in.
            self.cls_pt_layers = nn.ModuleList([BeitLayer(cfg) for _ in range(a["head_layers"])])
            self.norm = nn.LayerNorm(a["width"], eps=1e-6)
            self.lm_head = nn.Linear(a["width"], a["vocab_size"])
            self.window = (a["image_size"] // a["patch_size"],) * 2

        def forward(self, images, mask, positions, labels):
            x = self.trunk.embeddings(images, bool_masked_pos=mask)
            bias = self.trunk.shared_position_bias(self.window, dim_size=x.shape[1])
            x, early = run_blocks(self.trunk, x, images.shape[2:], bias, keep=self.early if self.cls_pt_layers
                                  else None)
            index = positions[..., None].expand(-1, -1, x.shape[-1])
            logits = self.lm_head(torch.gather(self.norm(x)[:, 1:], 1, index))
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            if len(self.cls_pt_layers):
                h = torch.cat([x[:, :1], early[:, 1:]], dim=1)
                for layer in self.cls_pt_layers:
                    h = layer(h, attention_mask=bias, resolution=images.shape[2:])
                logits2 = self.lm_head(torch.gather(self.norm(h)[:, 1:], 1, index))
                loss = loss + F.cross_entropy(logits2.float().flatten(0, 1), labels.flatten())
            return loss

    class Teacher(nn.Module):
        """CLIP visual tower (``transformers`` CLIPVisionModelWithProjection) or a DINO-style ViT (ViTModel)."""

        def __init__(self, t: dict):
            super().__init__()
            self.kind = t["kind"]
            kw = dict(hidden_size=t["width"], intermediate_size=4 * t["width"], num_hidden_layers=t["depth"],
                      num_attention_heads=t["num_heads"], image_size=t["image_size"], patch_size=t["patch_size"])
            if self.kind == "clip":
                from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

                cfg = CLIPVisionConfig(projection_dim=dict(t["extra"])["proj_dim"], hidden_act="quick_gelu",
                                       layer_norm_eps=1e-5, **kw)
                cfg._attn_implementation = "sdpa"
                self.model = CLIPVisionModelWithProjection(cfg)
                mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
            else:
                from transformers import ViTConfig, ViTModel

                cfg = ViTConfig(qkv_bias=True, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, **kw)
                cfg._attn_implementation = "sdpa"
                self.model = ViTModel(cfg, add_pooling_layer=False)
                mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
            self.requires_grad_(False)

        def forward(self, images):
            x = (images.clamp(0, 1) - self.mean) / self.std
            if self.kind == "clip":
                h = self.model.vision_model(pixel_values=x).last_hidden_state
                return self.model.visual_projection(self.model.vision_model.post_layernorm(h[:, 1:])).float()
            return self.model(pixel_values=x).last_hidden_state[:, 1:].float()

    class VQKD(nn.Module):
        """VQ-KD tokenizer training forward: encoder → codes → straight-through → decoder → cosine loss."""

        def __init__(self, a: dict):
            super().__init__()
            self.encoder, _ = _torch_vit_trunk(a["width"], a["depth"], a["num_heads"], a["image_size"],
                                               a["patch_size"], mlp_ratio=a["mlp_ratio"],
                                               use_absolute_position_embeddings=True)
            self.window = a["image_size"] // a["patch_size"]
            self.decoder, _ = _torch_vit_trunk(a["decoder_width"], a["decoder_depth"], a["decoder_heads"],
                                               self.window, 1, channels=a["code_dim"], mlp_ratio=a["mlp_ratio"],
                                               use_absolute_position_embeddings=True)
            self.enc_norm = nn.LayerNorm(a["width"], eps=1e-6)
            self.dec_norm = nn.LayerNorm(a["decoder_width"], eps=1e-6)
            self.encode_task = nn.Sequential(nn.Linear(a["width"], a["width"]), nn.Tanh(),
                                             nn.Linear(a["width"], a["code_dim"]))
            self.decode_task = nn.Sequential(nn.Linear(a["decoder_width"], a["decoder_width"]), nn.Tanh(),
                                             nn.Linear(a["decoder_width"], a["teacher_dim"]))
            self.register_buffer("codebook", F.normalize(torch.randn(a["num_codes"], a["code_dim"]), dim=-1))

        def forward(self, images, target):
            x = self.encoder.embeddings(images * 2.0 - 1.0)
            x, _ = run_blocks(self.encoder, x, images.shape[2:])
            with torch.autocast(images.device.type, enabled=False):
                z = F.normalize(self.encode_task(self.enc_norm(x[:, 1:]).float()), dim=-1)  # [B, N, c]
                cb = self.codebook
                dist = z.pow(2).sum(-1, keepdim=True) + cb.pow(2).sum(-1) - 2.0 * z @ cb.t()
                idx = dist.argmin(-1)
                z_q = cb[idx]
                commit = (z_q.detach() - z).pow(2).mean()
                z_st = z + (z_q - z).detach()
            b, n, c = z_st.shape
            code_map = z_st.transpose(1, 2).reshape(b, c, self.window, self.window)
            h = self.decoder.embeddings(code_map)
            h, _ = run_blocks(self.decoder, h, code_map.shape[2:])
            with torch.autocast(images.device.type, enabled=False):
                out = self.decode_task(self.dec_norm(h[:, 1:]).float())
                rec = (1.0 - (F.normalize(out, dim=-1) * F.normalize(target, dim=-1)).sum(-1)).mean()
            return rec + commit, z.detach().flatten(0, 1), idx.flatten()

    return Tokenizer, Pretrain, Teacher, VQKD


def _torch_optimizer(model, optim: dict, device: str):
    """AdamW with the no-decay rule (ndim ≤ 1, biases, cls token) as ours; fused on CUDA, foreach on CPU."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "cls_token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.get("weight_decay", 0.0)},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim["lr"], betas=(optim["b1"], optim["b2"]), eps=optim["eps"], **kw)


def _sdpa_context(settings: dict):
    """A context restricting ``scaled_dot_product_attention`` to ``settings['sdpa_backends']`` (or a no-op)."""
    import contextlib

    backends = settings.get("sdpa_backends")
    if not isinstance(backends, list):
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = [getattr(SDPBackend, name) for name in backends]
    return lambda: sdpa_kernel(chosen)


def torch_train_step(task: str, arch: dict, batch: dict, device: str, amp: bool, compile_model: bool,
                     settings: Optional[dict] = None):
    """``(step() -> loss tensor, trained parameter count)`` for the PyTorch mirror of our ``task`` step, under
    ``settings`` (``torch_settings``; default: those of ``device``)."""
    import torch

    settings = settings or torch_settings(device)
    Tokenizer, Pretrain, Teacher, VQKD = _torch_modules()
    torch.manual_seed(0)
    memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).to(  # noqa: E731
        device, memory_format=memory_format)
    sdpa = _sdpa_context(settings)
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    clip = arch["optim"].get("clip_grad") or 0.0

    if task == "pretrain":
        model = Pretrain(arch).to(device)
        frozen = Tokenizer(arch["tokenizer"]).to(device).eval().requires_grad_(False)
        images, tok_images = nchw(batch["image"]), nchw(batch["tokenizer_image"])
        mask = torch.from_numpy(batch["mask"]).to(device)
    else:
        model = VQKD(arch).to(device)
        frozen = Teacher(arch["teacher"]).to(device).eval()
        images = nchw(batch["image"])
    model.train()
    if settings["channels_last"]:
        model, frozen = model.to(memory_format=memory_format), frozen.to(memory_format=memory_format)
    opt = _torch_optimizer(model, arch["optim"], device)
    forward, frozen_forward = model, frozen
    if compile_model:
        mode = settings["compile_mode"]
        forward, frozen_forward = torch.compile(model, mode=mode), torch.compile(frozen, mode=mode)
    params = [p for p in model.parameters() if p.requires_grad]

    def finish(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    if task == "pretrain":
        k = arch["num_masked"]

        def step():
            # Masked positions in row-major order without a device sync (as ours; torch.nonzero would sync).
            positions = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
            with torch.no_grad(), autocast(), sdpa():
                labels = torch.gather(frozen_forward(tok_images), 1, positions)
            with autocast(), sdpa():
                loss = forward(images, mask, positions, labels)
            finish(loss)  # backward runs the kernels the forward chose (outside autocast, as recommended)
            return loss.detach()
    else:
        decay, num_codes = arch["decay"], arch["num_codes"]

        def step():
            with torch.no_grad(), autocast(), sdpa():
                target = frozen_forward(images)
            with autocast(), sdpa():
                loss, z_flat, idx = forward(images, target)
            finish(loss)
            with torch.no_grad():  # codebook EMA with re-normalisation (official norm_ema_inplace)
                cb = model.codebook
                bins = torch.zeros(num_codes, device=cb.device).index_add_(0, idx, torch.ones_like(z_flat[:, 0]))
                embed_sum = torch.zeros_like(cb).index_add_(0, idx, z_flat)
                new = torch.nn.functional.normalize(embed_sum / bins.clamp(min=1.0)[:, None], dim=-1)
                new = torch.where((bins == 0)[:, None], cb, new)
                cb.copy_(torch.nn.functional.normalize(decay * cb + (1.0 - decay) * new, dim=-1))
            return loss.detach()

    return step, sum(p.numel() for p in params)
