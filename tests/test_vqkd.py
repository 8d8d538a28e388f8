"""The VQ-KD tokenizer against PyTorch: teacher targets (transformers CLIP, timm DINO), a re-creation of the
official ``modeling_vqkd.VQKD`` forward / EMA step / gradients in torch primitives (reference §1), the released
tokenizer layouts at base size (§4b), and the codes as MIM labels.

Criterion for float outputs: max |ours − theirs| ≤ 1e-5 · max(1, max |theirs|) (as ``test_parity.py``); code
indices must agree exactly. PyTorch takes NCHW pixels, ours NHWC; images are in [0, 1] on our side.
(The codebook after 3 training steps on 8 devices vs 1 is covered by ``test_sharding.py``.)
"""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from beitv2_jax.convert import export_variables, import_state_dict, store
from beitv2_jax.convert.engine import flatten_variables
from beitv2_jax.convert.model_shapes import build_model, count_params
from beitv2_jax.models import beit as beit_lib
from beitv2_jax.models import teachers
from beitv2_jax.models import vqkd as vqkd_lib
from beitv2_jax.train.tasks import pretrain

transformers.utils.logging.disable_progress_bar()
RTOL = 1e-5
KEYS_FILE = Path(__file__).parent / "data" / "beitv2_state_dict_keys.txt"
SIZE, PATCH = 32, 8  # 4×4 patch grid for the teacher, the encoder and the decoder's code map


# ----------------------------------------------------------------------------------------------- helpers
def assert_close(name: str, ours, theirs, rtol: float = RTOL) -> float:
    """max |ours − theirs| ≤ rtol · max(1, max |theirs|); prints and returns the error."""
    ours = np.asarray(ours, np.float64)
    theirs = np.asarray(theirs.detach().numpy() if hasattr(theirs, "detach") else theirs, np.float64)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    err = float(np.abs(ours - theirs).max())
    bound = rtol * max(1.0, float(np.abs(theirs).max()))
    print(f"{name}: max abs err {err:.3g} (bound {bound:.3g})")
    assert err <= bound, f"{name}: max |ours - theirs| = {err:.3g} > {bound:.3g}"
    return err


def randomize_(model: nn.Module, seed: int, skip: tuple = ()) -> nn.Module:
    """Redraw every trainable parameter with non-trivial values (LayerNorm scales ≠ 1, biases ≠ 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(skip) or not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            elif p.ndim == 3 or "position_embedding" in name or "class_embedding" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
    return model


def images01(batch: int, seed: int) -> np.ndarray:
    """Random images ``[B, SIZE, SIZE, 3]`` in [0, 1] (float32, NHWC)."""
    return np.random.default_rng(seed).uniform(0, 1, (batch, SIZE, SIZE, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def state_dict_np(module: nn.Module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------- teachers (torch)
def hf_clip_teacher(seed: int = 0):
    """A small random ``CLIPVisionModelWithProjection`` (4×4 grid at 32 px, 24-d projection) and its config."""
    config = transformers.CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, image_size=SIZE, patch_size=PATCH,
                                           projection_dim=24, attn_implementation="eager")
    return randomize_(transformers.CLIPVisionModelWithProjection(config), seed).eval(), config


def timm_dino_teacher(seed: int = 1):
    """A small random timm ``VisionTransformer`` (DINO names), width 48, 4 heads."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=48, depth=2, num_heads=4, num_classes=0)
    return randomize_(model, seed).eval()


def official_scaling(x11: torch.Tensor, mean, std) -> torch.Tensor:
    """``ScalingLayerForClip`` / ``ScalingLayerForIM``: [−1, 1] → [0, 1] → (x − mean) / std."""
    x = ((x11 + 1.0) * 127.5).clamp(0, 255.0) / 255.0
    return (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]


@torch.no_grad()
def clip_target(model, x11: torch.Tensor) -> torch.Tensor:
    """Official CLIP target: ``ln_post`` on all tokens → drop CLS → ``@ proj`` → ``[B, N, proj_dim]``."""
    hidden = model.vision_model(pixel_values=official_scaling(x11, teachers.CLIP_MEAN, teachers.CLIP_STD))
    tokens = model.vision_model.post_layernorm(hidden.last_hidden_state)[:, 1:]
    return tokens @ model.visual_projection.weight.T


@torch.no_grad()
def dino_target(model, x11: torch.Tensor) -> torch.Tensor:
    """Official DINO target: final-norm patch tokens ``[B, N, D]`` of ImageNet-normalised pixels."""
    x = official_scaling(x11, teachers.IMAGENET_MEAN, teachers.IMAGENET_STD)
    return model.forward_features(x)[:, 1:]


def jax_teacher(kind: str, torch_teacher, hf_config=None, directory=None):
    """Convert a torch teacher (``hf_clip`` / ``dino`` layout) → ``(Teacher, params)``.

    With ``directory`` it goes through the store and ``teacher_from_checkpoint`` (the vqkd task's path)."""
    if kind == "clip":
        result = import_state_dict(state_dict_np(torch_teacher), "hf_clip", hf_config=hf_config.to_dict())
    else:
        result = import_state_dict(state_dict_np(torch_teacher), "dino", overrides={"num_heads": 4})
    if directory is not None:
        store.save_variables(str(directory), result.variables, result.model_kind, result.model_config)
        return teachers.teacher_from_checkpoint(kind, str(directory), image_size=SIZE)
    model = build_model(result.model_kind, result.model_config)
    norm = "clip" if kind == "clip" else "imagenet"
    return teachers.Teacher(model=model, normalisation=norm, project=kind == "clip"), result.variables["params"]


# ----------------------------------------------------------------------------------------------- teacher parity
def test_clip_teacher_target_matches_transformers(tmp_path):
    ref, config = hf_clip_teacher(seed=0)
    x = images01(3, seed=0)
    theirs = clip_target(ref, nchw(x) * 2.0 - 1.0)
    assert theirs.shape == (3, 16, 24)
    teacher, params = jax_teacher("clip", ref, config)
    assert teacher.feature_dim == 24 and teacher.model.use_final_norm and teacher.model.ln_pre
    pre = teachers.Teacher(model=teacher.model, normalisation="clip", project=True, use_norm=False)
    ours, without_ln_post = jax.jit(lambda p, im: (teacher.features(p, im), pre.features(p, im)))(
        params, jnp.asarray(x))
    assert_close("clip_teacher/target", ours, theirs)
    # ln_post must hit every token: the pre-norm tokens give another target.
    assert float(jnp.abs(without_ln_post - ours).max()) > 1e-2
    # The store + teacher_from_checkpoint path (the vqkd task's loader) gives the same teacher and weights.
    loaded, loaded_params = jax_teacher("clip", ref, config, directory=tmp_path / "clip")
    assert (loaded.model, loaded.normalisation, loaded.project, loaded.layer, loaded.use_norm) == (
        teacher.model, "clip", True, None, True)
    jax.tree.map(np.testing.assert_array_equal, loaded_params, params)


def test_dino_teacher_target_matches_timm(tmp_path):
    ref = timm_dino_teacher(seed=1)
    x = images01(3, seed=1)
    theirs = dino_target(ref, nchw(x) * 2.0 - 1.0)
    teacher, params = jax_teacher("dino", ref, directory=tmp_path / "dino")
    assert (teacher.normalisation, teacher.project, teacher.feature_dim) == ("imagenet", False, 48)
    assert_close("dino_teacher/target", jax.jit(teacher.features)(params, jnp.asarray(x)), theirs)


# ------------------------------------------------------------------------------------------ official VQ-KD in torch
class TorchAttention(nn.Module):
    """``modeling_finetune.Attention`` with ``qkv_bias=True``: learnable q/v bias, k bias ≡ 0, no rel-pos."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # [B, T, D] → [B, T, D]
        b, t, _ = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, -1))


class TorchMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TorchBlock(nn.Module):
    """Pre-LN block without layer scale (``init_values=0``), LayerNorm eps 1e-6."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), TorchAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), TorchMlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TorchPatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)


class TorchViT(nn.Module):
    """``modeling_finetune.VisionTransformer`` as the VQ-KD uses it: abs pos, mean-pooling variant, so the
    output is ``fc_norm(patch tokens)`` (``forward_features(x, return_patch_tokens=True)``)."""

    def __init__(self, image: int, patch: int, in_chans: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.patch_embed = TorchPatchEmbed(patch, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([TorchBlock(dim, heads) for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):  # [B, C, H, W] → [B, N, D]
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:])


class TorchEmbeddingEMA(nn.Module):
    """``norm_ema_quantizer.EmbeddingEMA`` with ``kmeans_init=False``: unit-norm rows, ``initted = 1``."""

    def __init__(self, num_tokens: int, dim: int, generator: torch.Generator):
        super().__init__()
        weight = F.normalize(torch.randn(num_tokens, dim, generator=generator), p=2, dim=-1)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.cluster_size = nn.Parameter(torch.zeros(num_tokens), requires_grad=False)
        self.embed_avg = nn.Parameter(weight.clone(), requires_grad=False)
        self.register_buffer("initted", torch.Tensor([True]))


def norm_ema_inplace(moving_avg, new, decay):
    moving_avg.data.mul_(decay).add_(new, alpha=1 - decay)
    moving_avg.data.copy_(F.normalize(moving_avg.data, p=2, dim=-1))


class TorchNormEMAVectorQuantizer(nn.Module):
    """``NormEMAVectorQuantizer.forward`` (beta 1, decay 0.99), single process (all_reduce = identity)."""

    def __init__(self, n_embed: int, dim: int, generator: torch.Generator, beta=1.0, decay=0.99):
        super().__init__()
        self.codebook_dim, self.num_tokens, self.beta, self.decay = dim, n_embed, beta, decay
        self.embedding = TorchEmbeddingEMA(n_embed, dim, generator)
        self.register_buffer("cluster_size", torch.zeros(n_embed))

    def forward(self, z):  # [B, C, h, w] → (z_q [B, C, h, w] straight-through, loss, indices [B·h·w])
        z = F.normalize(z.permute(0, 2, 3, 1), p=2, dim=-1)
        z_flat = z.reshape(-1, self.codebook_dim)
        weight = self.embedding.weight
        d = z_flat.pow(2).sum(dim=1, keepdim=True) + weight.pow(2).sum(dim=1) - 2 * torch.einsum(
            "bd,nd->bn", z_flat, weight)
        indices = torch.argmin(d, dim=1)
        z_q = F.embedding(indices, weight).view(z.shape)
        encodings = F.one_hot(indices, self.num_tokens).type(z.dtype)
        if not self.training:
            with torch.no_grad():
                self.cluster_size.data.mul_(self.decay).add_(encodings.sum(0), alpha=1 - self.decay)
        if self.training:
            bins = encodings.sum(0)
            self.cluster_size.data.mul_(self.decay).add_(bins, alpha=1 - self.decay)
            zero_mask = bins == 0
            bins = bins.masked_fill(zero_mask, 1.0)
            embed_sum = z_flat.t() @ encodings
            embed_normalized = F.normalize((embed_sum / bins.unsqueeze(0)).t(), p=2, dim=-1)
            embed_normalized = torch.where(zero_mask[..., None], weight, embed_normalized)
            norm_ema_inplace(weight, embed_normalized.detach(), self.decay)
        loss = self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), loss, indices


class TorchVQKD(nn.Module):
    """``modeling_vqkd.VQKD`` (``process_type='default'``, cosine rec loss) with a frozen teacher.

    ``teacher_kind`` 'clip' (HF CLIP with projection, CLIP scaling) or 'dino' (timm ViT, ImageNet scaling); the
    teacher and the scaling constants are registered as ``teacher_model`` / ``scaling_layer`` as in the official
    module, so its state dict carries the keys the official loader deletes."""

    def __init__(self, teacher, teacher_kind: str, *, width=64, depth=2, heads=4, decoder_width=48,
                 decoder_depth=3, decoder_heads=4, n_embed=64, code_dim=8, out_dim=24, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.encoder = TorchViT(SIZE, PATCH, 3, width, depth, heads)
        self.decoder = TorchViT(SIZE // PATCH, 1, code_dim, decoder_width, decoder_depth, decoder_heads)
        self.quantize = TorchNormEMAVectorQuantizer(n_embed, code_dim, gen)
        self.encode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, code_dim))
        self.decode_task_layer = nn.Sequential(nn.Linear(decoder_width, decoder_width), nn.Tanh(),
                                               nn.Linear(decoder_width, out_dim))
        self.teacher_kind = teacher_kind
        self.teacher_model = teacher
        mean, std = (teachers.CLIP_MEAN, teachers.CLIP_STD) if teacher_kind == "clip" else (
            teachers.IMAGENET_MEAN, teachers.IMAGENET_STD)
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer("shift", torch.tensor(mean)[None, :, None, None])
        self.scaling_layer.register_buffer("scale", torch.tensor(std)[None, :, None, None])
        randomize_(self, seed + 1, skip=("teacher_model.", "quantize."))
        for p in self.teacher_model.parameters():
            p.requires_grad_(False)

    @staticmethod
    def pre_process(data):
        """[0, 1] → [−1, 1] (``if data.max() <= 1: data = data * 255.``; ``data / 127.5 − 1``)."""
        if data.max() <= 1:
            data = data * 255.0
        return data / 127.5 - 1.0

    def encode(self, x):
        features = self.encoder(x)
        with torch.autocast("cpu", enabled=False):
            z = self.encode_task_layer(features.type_as(self.encode_task_layer[-1].weight))
        side = int(z.shape[1] ** 0.5)
        z = z.reshape(z.shape[0], side, side, -1).permute(0, 3, 1, 2)  # 'b (h w) c -> b c h w'
        z_q, loss, indices = self.quantize(z)
        return z_q, indices, loss

    def decode(self, z_q):
        return self.decode_task_layer(self.decoder(z_q))

    @torch.no_grad()
    def get_codebook_indices(self, x01):
        _, indices, _ = self.encode(self.pre_process(x01))
        return indices.view(x01.shape[0], -1)

    @torch.no_grad()
    def get_regress_target(self, x11):
        if self.teacher_kind == "clip":
            return clip_target(self.teacher_model, x11)
        return dino_target(self.teacher_model, x11)

    @staticmethod
    def calculate_rec_loss(rec, target):
        target = target / target.norm(dim=-1, keepdim=True)
        rec = rec / rec.norm(dim=-1, keepdim=True)
        return (1 - (target * rec).sum(-1)).mean()

    def forward(self, x01):
        x = self.pre_process(x01)
        target = self.get_regress_target(x)
        z_q, indices, quant_loss = self.encode(x)
        rec = self.decode(z_q)
        rec_loss = self.calculate_rec_loss(rec, target)
        return {"loss": quant_loss + rec_loss, "quant_loss": quant_loss, "rec_loss": rec_loss, "rec": rec,
                "indices": indices}


def official_rows(section: str = "b") -> list:
    """``(key, shape, note)`` rows of a section of the reference key list (b = the VQ-KD tokenizer)."""
    rows, current = [], None
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("## ("):
            current = line[4]
            continue
        if current == section and line.strip() and not line.startswith("#"):
            m = re.match(r"^(\S+) \(([\d, ]*)\)\s*(.*)$", line)
            rows.append((m.group(1), tuple(int(v) for v in m.group(2).replace(" ", "").split(",") if v),
                         m.group(3).strip()))
    return rows


def key_patterns(keys) -> set:
    return {re.sub(r"(?<=\.)\d+(?=\.)", "{}", k) for k in keys}


def make_torch_vqkd(teacher_kind: str, decoder_depth: int, seed: int = 0, **sizes):
    """``(TorchVQKD, jax Teacher, teacher params)`` for a small random CLIP or DINO teacher."""
    if teacher_kind == "clip":
        ref_teacher, config = hf_clip_teacher(seed=seed + 10)
        teacher, tparams = jax_teacher("clip", ref_teacher, config)
    else:
        ref_teacher, config = timm_dino_teacher(seed=seed + 10), None
        teacher, tparams = jax_teacher("dino", ref_teacher)
    sizes.setdefault("out_dim", teacher.feature_dim)
    ref = TorchVQKD(ref_teacher, teacher_kind, decoder_depth=decoder_depth, seed=seed, **sizes)
    return ref, teacher, tparams


def convert_vqkd(ref: TorchVQKD, heads: int = 4, decoder_heads: int = 4):
    """The torch tokenizer's state dict → our VQKD via the ``official_vqkd`` layout."""
    result = import_state_dict(state_dict_np(ref), "official_vqkd",
                               overrides={"num_heads": heads, "decoder_heads": decoder_heads})
    return build_model(result.model_kind, result.model_config), result


# ----------------------------------------------------------------------------------------------- VQ-KD parity
@pytest.mark.parametrize("teacher_kind,decoder_depth", [("clip", 3), ("dino", 1)])
def test_vqkd_forward_ema_and_gradients_match_official(teacher_kind, decoder_depth):
    ref, teacher, tparams = make_torch_vqkd(teacher_kind, decoder_depth, seed=3 if teacher_kind == "clip" else 4)
    sd = state_dict_np(ref)
    assert key_patterns(k for k in sd if not k.startswith(("teacher_model.", "scaling_layer."))) == key_patterns(
        k for k, _, _ in official_rows("b"))  # official names, fewer blocks
    model, result = convert_vqkd(ref)
    assert sorted(result.ignored) == sorted(k for k in sd if k.startswith(("teacher_model.", "scaling_layer.")))
    cfg = result.model_config
    assert (cfg["decoder_depth"], cfg["teacher_dim"], cfg["num_codes"], cfg["code_dim"]) == (
        decoder_depth, teacher.feature_dim, 64, 8)
    variables = result.variables
    x = images01(8, seed=5)
    xt = nchw(x)

    # Eval: get_codebook_indices = the official argmin, 100 % identical.
    ref.eval()
    theirs_idx = ref.get_codebook_indices(xt).numpy()
    ours_idx, eval_state = jax.jit(lambda v, im: model.apply(v, im, method="get_codebook_indices",
                                                             mutable=["codebook"]))(variables, jnp.asarray(x))
    ours_idx = np.asarray(ours_idx)
    assert ours_idx.dtype == np.int32 and ours_idx.shape == theirs_idx.shape == (8, 16)
    agree = float((ours_idx == theirs_idx).mean())
    print(f"{teacher_kind}: code agreement {100 * agree:.1f}% over {ours_idx.size} patches, "
          f"{len(np.unique(theirs_idx))} distinct codes")
    assert agree == 1.0
    # The pretraining step's masked-only ids (task layer + distances on K of N patches): the same official ids.
    positions = np.sort(np.random.default_rng(0).permutation(16)[:6])[None].repeat(8, 0)
    at = jax.jit(lambda v, im, pos: model.apply(v, im, pos, method="get_codebook_indices_at"))(
        variables, jnp.asarray(x), jnp.asarray(positions))
    np.testing.assert_array_equal(np.asarray(at), np.take_along_axis(theirs_idx, positions, 1))
    # Eval mode moves only the usage EMA (official `not self.training` branch), never the codebook.
    np.testing.assert_array_equal(np.asarray(eval_state["codebook"]["quantize"]["weight"]),
                                  variables["codebook"]["quantize"]["weight"])
    assert_close(f"{teacher_kind}/eval_cluster_size", eval_state["codebook"]["quantize"]["cluster_size"],
                 ref.quantize.cluster_size, rtol=1e-6)
    variables = {"params": variables["params"], "codebook": eval_state["codebook"]}

    # Train mode: one forward + backward + EMA step on both sides.
    ref.train()
    ref.zero_grad()
    out_t = ref(xt)
    out_t["loss"].backward()

    def loss_fn(params):
        out, new_state = model.apply({"params": params, "codebook": variables["codebook"]}, jnp.asarray(x),
                                     train=True, mutable=["codebook"])
        rec_loss = vqkd_lib.cosine_rec_loss(out["features"], teacher.features(tparams, jnp.asarray(x)))
        return rec_loss + out["quant_loss"], (out, rec_loss, new_state)

    (loss, (out, rec_loss, new_state)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"])
    np.testing.assert_array_equal(np.asarray(out["indices"]).reshape(-1), out_t["indices"].numpy())
    assert_close(f"{teacher_kind}/decoder_features", out["features"], out_t["rec"])
    assert_close(f"{teacher_kind}/quant_loss", out["quant_loss"], out_t["quant_loss"])
    assert_close(f"{teacher_kind}/rec_loss", rec_loss, out_t["rec_loss"])
    assert_close(f"{teacher_kind}/loss", loss, out_t["loss"])
    assert 0.0 < float(out["quant_loss"]) and 0.0 < float(rec_loss) < 2.0

    codebook = new_state["codebook"]["quantize"]
    moved = np.abs(np.asarray(codebook["weight"]) - np.asarray(variables["codebook"]["quantize"]["weight"])).max()
    assert moved > 1e-4  # the EMA step really changed the used codes
    assert_close(f"{teacher_kind}/ema_codebook", codebook["weight"], ref.quantize.embedding.weight, rtol=1e-6)
    assert_close(f"{teacher_kind}/cluster_size", codebook["cluster_size"], ref.quantize.cluster_size, rtol=1e-6)

    # Gradients of every trainable tensor, compared under the official names (our grads exported like params).
    ours_grads = export_variables({"params": grads, "codebook": variables["codebook"]}, "official_vqkd", "vqkd",
                                  cfg)
    worst, checked = 0.0, 0
    for name, p in ref.named_parameters():
        if not p.requires_grad:
            continue
        theirs = p.grad.numpy().astype(np.float64)
        scale = float(np.abs(theirs).max())
        assert scale > 0, name  # every trainable tensor gets a gradient
        relative = float(np.abs(np.asarray(ours_grads[name], np.float64) - theirs).max()) / scale
        assert relative <= RTOL, f"grad {name}: max error {relative:.3g} of its largest entry {scale:.3g}"
        worst, checked = max(worst, relative), checked + 1
    print(f"{teacher_kind}: {checked} gradient tensors, worst error {worst:.3g} relative to each tensor's max")


def test_vqkd_encoder_input_and_fp32_task_layer_are_official():
    """Our [0, 1] → [−1, 1] pre-processing equals the official ×255 / 127.5 − 1, and the task layers run in fp32
    even for a bfloat16 model (official ``autocast(enabled=False)``)."""
    x = images01(2, seed=6)
    official = TorchVQKD.pre_process(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(vqkd_lib.VQKD.preprocess(jnp.asarray(x))), official, atol=1e-6)
    cfg = dict(image_size=SIZE, patch_size=PATCH, width=32, depth=1, num_heads=2, decoder_depth=1, num_codes=16,
               code_dim=8, teacher_dim=8, dtype="bfloat16")
    model = build_model("vqkd", cfg)
    images = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    tokens, z = jax.eval_shape(lambda v, im: model.apply(v, im, method=lambda m, im: (
        m.encoder(m.preprocess(im))["patch_tokens"], m.encode_task_layer(m.encoder(m.preprocess(im))[
            "patch_tokens"]))), variables, images)
    assert tokens.dtype == jnp.bfloat16 and z.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------- released layouts
RELEASED = {  # name → (decoder depth, decode_task_layer output = teacher dim)
    "vqkd_encoder_base_decoder_1x768x12_clip": (1, 512),
    "vqkd_encoder_base_decoder_3x768x12_clip": (3, 512),
    "vqkd_encoder_base_decoder_1x768x12_dino": (1, 768),
    "vqkd_encoder_base_decoder_3x768x12_dino": (3, 768),
}
TEACHER_EXTRAS = {
    "clip": {"teacher_model.visual.conv1.weight": (768, 3, 16, 16), "teacher_model.visual.proj": (768, 512),
             "teacher_model.transformer.resblocks.0.ln_1.weight": (512,), "teacher_model.logit_scale": (),
             "teacher_model.token_embedding.weight": (16, 512)},
    "dino": {"teacher_model.cls_token": (1, 1, 768), "teacher_model.pos_embed": (1, 197, 768),
             "teacher_model.blocks.0.attn.qkv.weight": (2304, 768), "teacher_model.norm.weight": (768,)},
}


def released_rows(decoder_depth: int, teacher_dim: int) -> list:
    """The reference key list (3-layer CLIP tokenizer) adapted to another decoder depth / teacher dim."""
    rows = []
    for key, shape, note in official_rows("b"):
        m = re.match(r"decoder\.blocks\.(\d+)\.", key)
        if m and int(m.group(1)) >= decoder_depth:
            continue
        if key.startswith("decode_task_layer.2."):
            shape = (teacher_dim,) + shape[1:]
        rows.append((key, shape, note))
    return rows


@pytest.fixture(scope="module")
def base_tensors():
    """One pool of random float32 values, sliced into every base-size tensor (no 4 × 110M draws)."""
    return np.random.default_rng(0).standard_normal(110_000_000 // 4, dtype=np.float32)


def pooled_tensor(pool: np.ndarray, shape: tuple, offset: int) -> np.ndarray:
    size = int(np.prod(shape))
    start = offset % (pool.size - size)
    return pool[start:start + size].reshape(shape)


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_tokenizer_layouts_import_at_base_size(name, base_tensors):
    decoder_depth, teacher_dim = RELEASED[name]
    rows = released_rows(decoder_depth, teacher_dim)
    sd = {}
    for i, (key, shape, _) in enumerate(rows):
        sd[key] = np.ones(shape, np.float32) if key.endswith("initted") else pooled_tensor(
            base_tensors, shape, 7919 * i)
    extras = {k: np.zeros(s, np.float32) for k, s in TEACHER_EXTRAS[name.rsplit("_", 1)[1]].items()}
    extras.update({"scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32),
                   "scaling_layer.scale": np.ones((1, 3, 1, 1), np.float32)})
    result = import_state_dict({**sd, **extras}, "official_vqkd")  # checks every shape against eval_shape init
    assert sorted(result.ignored) == sorted(extras)
    cfg = result.model_config
    assert {k: cfg[k] for k in ("image_size", "patch_size", "width", "depth", "num_heads", "decoder_depth",
                                "decoder_width", "decoder_heads", "num_codes", "code_dim", "teacher_dim")} == dict(
        image_size=224, patch_size=16, width=768, depth=12, num_heads=12, decoder_depth=decoder_depth,
        decoder_width=768, decoder_heads=12, num_codes=8192, code_dim=32, teacher_dim=teacher_dim)
    assert len(sd) == (220 if decoder_depth == 3 else 194)
    learnable = sum(int(np.prod(s)) for _, s, note in rows if "buffer" not in note and "requires_grad" not in note)
    assert count_params("vqkd", cfg) == learnable
    print(f"{name}: {len(sd)} keys, {learnable:,} learnable params")

    model = build_model("vqkd", cfg)
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), result.variables)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    labels = jax.eval_shape(lambda v, x: model.apply(v, x, method="get_codebook_indices"), variables, images)
    assert (labels.shape, labels.dtype) == ((2, 196), jnp.int32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
    assert out["features"].shape == (2, 196, teacher_dim)
    flat = flatten_variables(result.variables)
    np.testing.assert_array_equal(flat["codebook/quantize/weight"], sd["quantize.embedding.weight"])


def test_converted_small_tokenizer_gives_mim_labels():
    """A small converted ``1x…_clip``-style tokenizer (1 decoder layer, 512-d decode_task_layer, teacher keys
    in the file): ``get_codebook_indices`` gives ``[B, N]`` int32 labels in ``[0, K)`` (= the torch argmin) that
    the pretraining loss consumes. (The 3-layer and DINO variants: the parity test and the base-size imports.)"""
    ref = TorchVQKD(nn.Identity(), "clip", decoder_depth=1, out_dim=512, n_embed=32, seed=9)
    model, result = convert_vqkd(ref)
    assert (result.model_config["teacher_dim"], result.model_config["decoder_depth"]) == (512, 1)
    x = images01(4, seed=7)
    backbone = beit_lib.beit_backbone(image_size=SIZE, patch_size=PATCH, width=32, depth=2, num_heads=2)
    mim = beit_lib.BEiTPretrainModel(backbone=backbone, vocab_size=32, num_masked_patches=6, early_layers=1)
    mask = jnp.zeros((4, 16), bool).at[:, 3:9].set(True)

    @jax.jit
    def labels_and_loss(tokenizer_variables, images):
        labels = model.apply(tokenizer_variables, images, method="get_codebook_indices")
        params = mim.init(jax.random.PRNGKey(0), images, mask)
        out = mim.apply(params, images, mask)
        return labels, pretrain.mim_loss(out["logits_1"], beit_lib.gather_tokens(labels, out["positions"]))

    labels, (loss, acc) = labels_and_loss(result.variables, jnp.asarray(x))
    assert labels.shape == (4, 16) and labels.dtype == jnp.int32
    assert 0 <= int(labels.min()) and int(labels.max()) < 32 and len(np.unique(np.asarray(labels))) > 1
    np.testing.assert_array_equal(np.asarray(labels), ref.eval().get_codebook_indices(nchw(x)).numpy())
    assert np.isfinite(float(loss)) and abs(float(loss) - np.log(32)) < 1.0 and 0.0 <= float(acc) <= 1.0
