"""One configurable Vision Transformer (Flax linen) for every encoder in the project.

It covers the BEiT v2 backbone (q/v bias, shared relative position bias, layer scale, mask token), the VQ-KD
encoder/decoder (absolute positions, mean pooling with ``fc_norm``), the OpenAI/HF CLIP visual tower
(``ln_pre``, full qkv bias, quick-GELU, ``ln_post`` + projection) and DINO / HF ViT (absolute positions, full
qkv bias). Images are NHWC ``[batch, height, width, channels]``.

Parameter layout (names chosen to mirror the official PyTorch names, so converters stay readable)::

  patch_embed/{kernel [p, p, C, D], bias [D]}     cls_token [1, 1, D]   mask_token [1, 1, D]
  pos_embed [1, 1 + N, D]   ln_pre/{scale, bias}   rel_pos_bias/relative_position_bias_table [R, H]
  blocks_{i}/{norm1, attn/{qkv [D, 3, H, Dh], q_bias [H, Dh], v_bias [H, Dh] | qkv_bias [3, H, Dh],
              relative_position_bias_table [R, H], proj [H, Dh, D], proj_bias [D]},
              norm2, mlp/{fc1, fc2}, gamma_1 [D], gamma_2 [D]}
  norm/{scale, bias}   fc_norm/{scale, bias}   head/{kernel [D, classes], bias}

Every parameter carries logical axis names (``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``) so the sharding
code can map them onto a device mesh without touching the model.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.models import relpos

Dtype = Any
Initializer = Callable[..., jax.Array]

QKV_BIAS_MODES = ("none", "qv", "full")
REL_POS_MODES = ("none", "shared", "per_layer")
POOLING_MODES = ("cls", "mean", "none")
ACTIVATIONS = ("gelu", "quick_gelu")
INIT_STYLES = ("beit", "torch_default")
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")


def resolve_attention_impl(impl: str, dtype: Dtype = jnp.float32, head_dim: int = 64,
                           platform: Optional[str] = None) -> str:
    """The attention kernel ``impl`` stands for on ``platform`` (default: JAX's default backend).

    ``auto``: cuDNN fused attention on a GPU for bf16/fp16 with a head dim cuDNN takes (multiple of 8, ≤ 128), else
    the XLA path of ``jax.nn.dot_product_attention`` on GPU/TPU (fused by XLA, float32 logits), and the einsum path
    on CPU (the reference numerics). Any other value is returned as is.
    """
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        if platform != "rocm" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 \
                and head_dim <= 128:
            return "cudnn"
        return "xla"
    if platform == "tpu":
        return "xla"
    return "einsum"


def needs_even_tokens(impl: str, has_bias: bool, tokens: int) -> bool:
    """cuDNN trains with an attention bias only at an even sequence length (197 = 14² + CLS is odd)."""
    return impl == "cudnn" and has_bias and tokens % 2 == 1


def pad_bias_to(bias: jax.Array, tokens: int) -> jax.Array:
    """Position bias ``[..., T, T]`` → ``[..., tokens, tokens]`` for a sequence padded at the end with tokens that no
    query attends to: bias −1e9 in their key columns (softmax weight exactly 0), 0 in their rows."""
    extra = tokens - bias.shape[-1]
    if extra <= 0:
        return bias
    lead = ((0, 0),) * (bias.ndim - 2)
    bias = jnp.pad(bias, lead + ((0, extra), (0, 0)))
    return jnp.pad(bias, lead + ((0, 0), (0, extra)), constant_values=-1e9)


def sum_leading_axis_pairwise(x: jax.Array) -> jax.Array:
    """``x.sum(0)`` as log₂(n) rounds of adding adjacent rows (pairwise summation): ``[n, ...]`` → ``[...]``.

    XLA:CPU runs a leading-axis reduce of a ``[B, H, T, T]`` array as a YNNPACK fusion at ≈ 2 GB/s (1.2 ms for one
    ``[32, 4, 65, 65]`` float32 array on 2 cores); the same sum as elementwise adds streams at memory speed
    (0.14 ms). Adjacent rows (not halves) are added so that a batch sharded over a mesh stays local until the
    rows left are as few as the shards.
    """
    leftover = None
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            leftover = x[-1] if leftover is None else leftover + x[-1]
            x = x[:-1]
        x = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
        x = x[:, 0] + x[:, 1]
    return x[0] if leftover is None else x[0] + leftover


@jax.custom_vjp
def add_batch_shared_bias(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """``logits [B, H, T, T] + bias [H, T, T]`` (one bias for every example); the bias gradient, a sum over the
    batch, is taken by :func:`sum_leading_axis_pairwise` (same value as autodiff's reduce, another summation
    order)."""
    return logits + bias[None]


def _add_batch_shared_bias_fwd(logits, bias):
    return add_batch_shared_bias(logits, bias), None  # no residuals: the backward needs only the cotangent


def _add_batch_shared_bias_bwd(_, grad):
    return grad, sum_leading_axis_pairwise(grad)


add_batch_shared_bias.defvjp(_add_batch_shared_bias_fwd, _add_batch_shared_bias_bwd)


# ----------------------------------------------------------------------------------------------- initialisers
def trunc_normal(std: float = 0.02, truncation: float = 1.0, scale: float = 1.0) -> Initializer:
    """Truncated normal N(0, std²) cut at ±``truncation``·std (no variance correction), times ``scale``.

    The official BEiT v2 pretraining model truncates at ±1σ; timm's default (±2 absolute) is ±100σ at std 0.02.
    """

    def init(key, shape, dtype=jnp.float32):
        return jax.random.truncated_normal(key, -truncation, truncation, shape, jnp.float32).astype(dtype) * (
            std * scale)

    return init


def torch_uniform(fan_in: int, scale: float = 1.0) -> Initializer:
    """PyTorch's default Linear/Conv init: U(−1/√fan_in, 1/√fan_in) (kaiming-uniform with a=√5), times ``scale``."""
    bound = scale / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def _param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int], names: Sequence[Optional[str]]):
    """A float32 parameter annotated with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(names)), tuple(shape), jnp.float32)


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x·σ(1.702x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x·Φ(x) = ½·x·(1 + erf(x/√2)) (torch's default ``nn.GELU``). Written with ``erf`` rather than
    ``jax.nn.gelu(approximate=False)``'s ``erfc``, whose select-heavy expansion and derivative cost XLA:CPU ≈ 13 % of
    the demo's pretraining step; same function (differences at float32 rounding level)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "gelu":
        return gelu
    if name == "quick_gelu":
        return quick_gelu
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


# ----------------------------------------------------------------------------------------------- layers
class Dense(nn.Module):
    """Linear layer with a kernel ``[in, out]`` named by logical axes; init 'beit' (trunc-normal) or torch default."""

    features: int
    names: tuple = ("embed", "mlp")
    use_bias: bool = True
    init_style: str = "beit"
    init_std: float = 0.02
    init_truncation: float = 1.0
    kernel_scale: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        if self.init_style == "beit":
            kernel_init, bias_init = trunc_normal(self.init_std, self.init_truncation, self.kernel_scale), \
                nn.initializers.zeros
        else:
            kernel_init, bias_init = torch_uniform(fan_in, self.kernel_scale), torch_uniform(fan_in)
        kernel = _param(self, "kernel", kernel_init, (fan_in, self.features), self.names)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = _param(self, "bias", bias_init, (self.features,), self.names[-1:])
            y = y + bias.astype(self.dtype)
        return y


class Mlp(nn.Module):
    """fc1 → activation → fc2, hidden ``mlp_dim``."""

    mlp_dim: int
    activation: str = "gelu"
    init_style: str = "beit"
    init_std: float = 0.02
    init_truncation: float = 1.0
    fc2_scale: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        common = dict(init_style=self.init_style, init_std=self.init_std, init_truncation=self.init_truncation,
                      dtype=self.dtype)
        h = Dense(self.mlp_dim, names=("embed", "mlp"), name="fc1", **common)(x)
        h = activation_fn(self.activation)(h)
        return Dense(dim, names=("mlp", "embed"), kernel_scale=self.fc2_scale, name="fc2", **common)(h)


class Attention(nn.Module):
    """Multi-head self-attention with BEiT (q/v) or full qkv bias and an optional additive position bias.

    qkv kernel ``[D, 3, heads, head_dim]``; output projection kernel ``[heads, head_dim, D]``.
    """

    num_heads: int
    qkv_bias: str = "qv"
    window: Optional[tuple] = None  # set → own relative position table for this window (per-layer mode)
    init_style: str = "beit"
    init_std: float = 0.02
    init_truncation: float = 1.0
    proj_scale: float = 1.0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
        """x ``[B, T, D]``; bias ``[heads, T, T]`` (added to the attention logits) → ``[B, T, D]``."""
        dim = x.shape[-1]
        heads = self.num_heads
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {heads}")
        head_dim = dim // heads
        if self.init_style == "beit":
            qkv_init = trunc_normal(self.init_std, self.init_truncation)
            proj_init = trunc_normal(self.init_std, self.init_truncation, self.proj_scale)
            proj_bias_init = nn.initializers.zeros
        else:
            qkv_init = torch_uniform(dim)
            proj_init = torch_uniform(dim, self.proj_scale)
            proj_bias_init = torch_uniform(dim)
        qkv_kernel = _param(self, "qkv", qkv_init, (dim, 3, heads, head_dim), ("embed", None, "heads", "kv"))
        # q, k, v as three matmuls with the kernel's slices (not one [3, B, T, H, Dh] product sliced afterwards:
        # that slice's gradient is a pad + add of the whole product per block).
        xc, kernel = x.astype(self.dtype), qkv_kernel.astype(self.dtype)
        q, k, v = (jnp.einsum("btd,dhk->bthk", xc, kernel[:, i]) for i in range(3))  # [B, T, H, Dh]
        if self.qkv_bias == "qv":
            q_bias = _param(self, "q_bias", nn.initializers.zeros, (heads, head_dim), ("heads", "kv"))
            v_bias = _param(self, "v_bias", nn.initializers.zeros, (heads, head_dim), ("heads", "kv"))
            q, v = q + q_bias.astype(self.dtype), v + v_bias.astype(self.dtype)
        elif self.qkv_bias == "full":
            qkv_b = _param(self, "qkv_bias", nn.initializers.zeros, (3, heads, head_dim), (None, "heads", "kv"))
            q, k, v = (t + qkv_b[i].astype(self.dtype) for i, t in enumerate((q, k, v)))
        elif self.qkv_bias != "none":
            raise ValueError(f"qkv_bias must be one of {QKV_BIAS_MODES}, got {self.qkv_bias!r}")

        if self.window is not None:
            table = _param(self, "relative_position_bias_table", nn.initializers.zeros,
                           (relpos.num_relative_distance(self.window), heads), (None, "heads"))
            own = relpos.gather_bias(table, self.window)
            bias = own if bias is None else bias + own

        scale = head_dim ** -0.5
        impl = resolve_attention_impl(self.attention_impl, self.dtype, head_dim)
        if bias is not None and bias.shape[-1] < x.shape[1]:
            bias = pad_bias_to(bias, x.shape[1])  # the sequence was padded to an even length at the embedding
        if impl == "einsum":
            # q·k in the compute dtype, accumulated and returned in float32 (no bf16 rounding of the logits); the
            # softmax runs in float32 and the probabilities go back to the compute dtype for the ·v product. The
            # bf16 algorithm preset keeps the backward matmuls (float32 cotangent × bf16 q/k) on bf16 inputs too, as
            # jax.nn.dot_product_attention does; float32 models keep the default precision (unchanged numerics).
            precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
            logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k, precision=precision,
                                preferred_element_type=jnp.float32)
            if bias is not None:
                logits = add_batch_shared_bias(logits, bias.astype(jnp.float32))
            weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        elif impl in ("xla", "cudnn"):
            # The bias is shared across the batch: pass it as [1, H, T, T] (dot_product_attention broadcasts any
            # 4-d bias to [B, H, T, T]) instead of materialising a copy per example. The XLA path adds it to its
            # float32 logits, so it stays float32 there; cuDNN takes it in the q/k/v dtype.
            att_bias = None
            if bias is not None:
                att_bias = bias[None].astype(jnp.float32 if impl == "xla" else self.dtype)
            tokens = q.shape[1]
            pad = needs_even_tokens(impl, att_bias is not None, tokens)
            if pad:
                # Blocks used outside VisionTransformer (the BEiT aggregation head) on an odd sequence: one zero
                # token more, which no query attends to (bias −1e9 in its key column) and whose row is dropped.
                # VisionTransformer pads once at the embedding instead, so its blocks never get here.
                q, k, v = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (q, k, v))
                att_bias = pad_bias_to(att_bias, tokens + 1)
            out = jax.nn.dot_product_attention(q, k, v, bias=att_bias, scale=scale, implementation=impl)
            if pad:
                out = out[:, :tokens]
        else:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")

        proj_kernel = _param(self, "proj", proj_init, (heads, head_dim, dim), ("heads", "kv", "embed"))
        proj_bias = _param(self, "proj_bias", proj_bias_init, (dim,), ("embed",))
        return jnp.einsum("bthk,hkd->btd", out, proj_kernel.astype(self.dtype)) + proj_bias.astype(self.dtype)


class Block(nn.Module):
    """Pre-LN transformer block: x += γ₁·attn(LN₁(x)); x += γ₂·mlp(LN₂(x)), each through drop path.

    ``layer_id`` (1-based) rescales attn.proj and mlp.fc2 by 1/√(2·layer_id) at init (official ``fix_init_weight``).
    """

    num_heads: int
    mlp_dim: int
    layer_id: int = 1
    qkv_bias: str = "qv"
    layer_scale_init: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"
    window: Optional[tuple] = None
    init_style: str = "beit"
    init_std: float = 0.02
    init_truncation: float = 1.0
    attention_impl: str = "auto"
    deterministic: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
        """x ``[B, T, D]``, shared position bias ``[heads, T, T]`` or None → ``[B, T, D]``."""
        dim = x.shape[-1]
        rescale = 1.0 / math.sqrt(2.0 * self.layer_id)
        common = dict(init_style=self.init_style, init_std=self.init_std, init_truncation=self.init_truncation,
                      dtype=self.dtype)
        # Drop path = per-sample dropout of the whole residual branch (mask broadcast over tokens and features).
        drop_path = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2), deterministic=self.deterministic)

        h = _layer_norm(self.layer_norm_eps, self.dtype, "norm1")(x)
        h = Attention(self.num_heads, qkv_bias=self.qkv_bias, window=self.window, proj_scale=rescale,
                      attention_impl=self.attention_impl, name="attn", **common)(h, bias)
        if self.layer_scale_init > 0:
            h = h * _param(self, "gamma_1", nn.initializers.constant(self.layer_scale_init), (dim,),
                           ("embed",)).astype(self.dtype)
        x = x + (drop_path(h) if self.drop_path_rate > 0 else h)

        h = _layer_norm(self.layer_norm_eps, self.dtype, "norm2")(x)
        h = Mlp(self.mlp_dim, activation=self.activation, fc2_scale=rescale, name="mlp", **common)(h)
        if self.layer_scale_init > 0:
            h = h * _param(self, "gamma_2", nn.initializers.constant(self.layer_scale_init), (dim,),
                           ("embed",)).astype(self.dtype)
        return x + (drop_path(h) if self.drop_path_rate > 0 else h)


def block_class(remat_policy: str = "none"):
    """``Block`` or its rematerialised version (``remat_policy`` names a ``jax.checkpoint_policies`` member)."""
    if remat_policy in ("none", "", None):
        return Block
    if not hasattr(jax.checkpoint_policies, remat_policy):
        raise ValueError(f"remat_policy {remat_policy!r} is not in jax.checkpoint_policies")
    return nn.remat(Block, policy=getattr(jax.checkpoint_policies, remat_policy), prevent_cse=True)


def drop_path_rates(rate: float, depth: int) -> np.ndarray:
    """Stochastic-depth rate per block, linearly spaced from 0 to ``rate`` (``torch.linspace`` semantics)."""
    return np.linspace(0.0, rate, depth) if depth > 1 else np.array([0.0] * depth)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution: ``[B, H, W, C]`` → ``[B, (H/p)·(W/p), D]``.

    Computed as what it is, one matmul of the flattened ``p × p × C`` patches with the ``[p·p·C, D]`` kernel (the
    stride-``p`` convolution's maths; a plain dot is what every backend runs best, forward and backward).
    """

    patch_size: int
    width: int
    use_bias: bool = True
    init_style: str = "beit"
    init_std: float = 0.02
    init_truncation: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p, channels = self.patch_size, images.shape[-1]
        fan_in = p * p * channels
        if self.init_style == "beit":
            kernel_init, bias_init = trunc_normal(self.init_std, self.init_truncation), nn.initializers.zeros
        else:
            kernel_init, bias_init = torch_uniform(fan_in), torch_uniform(fan_in)
        kernel = _param(self, "kernel", kernel_init, (p, p, channels, self.width), (None, None, None, "embed"))
        b, height, width = images.shape[:3]
        h, w = height // p, width // p
        patches = images[:, :h * p, :w * p].astype(self.dtype).reshape(b, h, p, w, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, fan_in)  # (row, col, channel) = HWI order
        x = jnp.dot(patches, kernel.astype(self.dtype).reshape(fan_in, self.width))
        if self.use_bias:
            x = x + _param(self, "bias", bias_init, (self.width,), ("embed",)).astype(self.dtype)
        return x


# ----------------------------------------------------------------------------------------------- the ViT
class VisionTransformer(nn.Module):
    """The configurable ViT. Call with images ``[B, H, W, C]`` and optionally a patch mask ``[B, N]`` (bool).

    Returns a dict:
      ``encoded``  ``[B, T, D]`` tokens after the final ``norm`` (= ``pre_norm`` when ``use_final_norm`` is off);
      ``pre_norm`` ``[B, T, D]`` output of the last block;
      ``patch_tokens`` ``[B, N, D]``: ``fc_norm`` of the final patch tokens for models with ``use_fc_norm``
      (the VQ-KD encoder/decoder output), else ``encoded`` without the class token;
      ``pooled`` ``[B, D]``: ``encoded[:, 0]`` (``cls``) or ``fc_norm(mean of patch tokens)`` (``mean``);
      ``logits`` ``[B, num_classes]`` when a head is configured;
      ``blocks`` tuple of every block's output ``[B, T, D]`` when ``return_blocks=True``;
      ``shared_bias`` ``[heads, T, T]`` with ``rel_pos='shared'`` (reused by heads built on top).
    T = N (+1 with a class token).
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: str = "qv"  # none | qv (BEiT: q and v bias, k bias ≡ 0) | full (CLIP, DINO, HF ViT)
    patch_embed_bias: bool = True  # CLIP's conv1 has none
    use_abs_pos: bool = False  # learned absolute position embedding [1, T, D]
    rel_pos: str = "none"  # none | shared (one table for all blocks) | per_layer
    layer_scale_init: float = 0.0  # 0 = no layer scale
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"  # gelu (exact erf) | quick_gelu (CLIP)
    ln_pre: bool = False  # CLIP: LayerNorm after embeddings
    use_cls_token: bool = True
    use_mask_token: bool = False
    use_final_norm: bool = True  # `norm` on all tokens (BEiT pretraining, CLIP ln_post, DINO, HF ViT)
    use_fc_norm: bool = False  # `fc_norm` on patch tokens / their mean (mean-pooling models)
    pooling: str = "cls"  # cls | mean | none
    num_classes: int = 0  # > 0 → `head` Dense on the pooled feature
    head_bias: bool = True
    head_init_scale: float = 1.0
    init_std: float = 0.02
    init_truncation: float = 1.0  # in units of init_std; 1.0 = official pretraining, 100 ≈ timm default
    patch_embed_init: str = "beit"  # beit (trunc-normal) | torch_default
    attention_impl: str = "auto"  # auto (cuDNN on GPU in bf16, XLA on TPU, einsum on CPU) | einsum | xla | cudnn
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32

    @property
    def window(self) -> tuple:
        return relpos.window_for_image(self.image_size, self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.window[0] * self.window[1]

    def _check_config(self):
        for value, allowed, key in ((self.qkv_bias, QKV_BIAS_MODES, "qkv_bias"), (self.rel_pos, REL_POS_MODES,
                                    "rel_pos"), (self.pooling, POOLING_MODES, "pooling"),
                                    (self.activation, ACTIVATIONS, "activation"),
                                    (self.patch_embed_init, INIT_STYLES, "patch_embed_init"),
                                    (self.attention_impl, ATTENTION_IMPLS, "attention_impl")):
            if value not in allowed:
                raise ValueError(f"model.{key} must be one of {allowed}, got {value!r}")
        if self.rel_pos != "none" and not self.use_cls_token:
            raise ValueError("model.rel_pos needs use_cls_token=True (the table has CLS entries)")

    def embed(self, images: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """Patch embedding, mask token, class token, absolute positions, ln_pre: → ``[B, T, D]``."""
        b, h, w, _ = images.shape
        if (h, w) != (self.window[0] * self.patch_size, self.window[1] * self.patch_size):
            raise ValueError(f"expected images of {self.image_size}px (window {self.window}), got {(h, w)}")
        x = PatchEmbed(self.patch_size, self.width, use_bias=self.patch_embed_bias, init_style=self.patch_embed_init,
                       init_std=self.init_std, init_truncation=self.init_truncation, dtype=self.dtype,
                       name="patch_embed")(images)
        token_init = trunc_normal(self.init_std, self.init_truncation)
        if self.use_mask_token:
            mask_token = _param(self, "mask_token", token_init, (1, 1, self.width), (None, None, "embed"))
            if mask is not None:
                if mask.shape != x.shape[:2]:
                    raise ValueError(f"mask must be [batch, num_patches] = {x.shape[:2]}, got {mask.shape}")
                w_mask = mask.astype(self.dtype)[..., None]
                x = x * (1 - w_mask) + mask_token.astype(self.dtype) * w_mask
        elif mask is not None:
            raise ValueError("a mask was given but the model has no mask token (use_mask_token=False)")
        if self.use_cls_token:
            cls = _param(self, "cls_token", token_init, (1, 1, self.width), (None, None, "embed"))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], axis=1)
        if self.use_abs_pos:
            pos = _param(self, "pos_embed", token_init, (1, x.shape[1], self.width), (None, None, "embed"))
            x = x + pos.astype(self.dtype)
        if self.ln_pre:
            x = _layer_norm(self.layer_norm_eps, self.dtype, "ln_pre")(x)
        return x

    def shared_bias(self) -> Optional[jax.Array]:
        """The shared relative position bias ``[heads, T, T]`` (None unless ``rel_pos == 'shared'``)."""
        if self.rel_pos != "shared":
            return None
        table = ShareRelPosTable(self.window, self.num_heads, name="rel_pos_bias")()
        return relpos.gather_bias(table, self.window)

    def block(self, index: int, drop_path: float, train: bool) -> nn.Module:
        return block_class(self.remat_policy)(
            num_heads=self.num_heads, mlp_dim=int(self.width * self.mlp_ratio), layer_id=index + 1,
            qkv_bias=self.qkv_bias, layer_scale_init=self.layer_scale_init, drop_path_rate=float(drop_path),
            layer_norm_eps=self.layer_norm_eps, activation=self.activation,
            window=self.window if self.rel_pos == "per_layer" else None, init_std=self.init_std,
            init_truncation=self.init_truncation, attention_impl=self.attention_impl, deterministic=not train,
            dtype=self.dtype, name=f"blocks_{index}")

    @nn.compact
    def __call__(self, images: jax.Array, mask: Optional[jax.Array] = None, *, train: bool = False,
                 return_blocks: bool = False) -> dict:
        self._check_config()
        x = self.embed(images, mask)
        bias = self.shared_bias()
        rates = drop_path_rates(self.drop_path_rate, self.depth)
        tokens = x.shape[1]
        impl = resolve_attention_impl(self.attention_impl, self.dtype, self.width // self.num_heads)
        if needs_even_tokens(impl, self.rel_pos != "none", tokens):
            # One zero token at the end, padded once here rather than q/k/v in every block; no query attends to
            # it (the blocks pad the bias with −1e9 in its key column) and it is dropped after the last block.
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
        block_bias = None if bias is None else pad_bias_to(bias, x.shape[1])
        blocks = []
        for i in range(self.depth):
            x = self.block(i, rates[i], train)(x, block_bias)
            if return_blocks:
                blocks.append(x[:, :tokens])
        x = x[:, :tokens]
        out = {"pre_norm": x}
        if bias is not None:
            out["shared_bias"] = bias
        x = _layer_norm(self.layer_norm_eps, self.dtype, "norm")(x) if self.use_final_norm else x
        out["encoded"] = x
        first_patch = 1 if self.use_cls_token else 0
        patches = x[:, first_patch:]
        fc_norm = _layer_norm(self.layer_norm_eps, self.dtype, "fc_norm") if self.use_fc_norm else None
        out["patch_tokens"] = fc_norm(patches) if fc_norm is not None else patches
        if self.pooling == "cls":
            if not self.use_cls_token:
                raise ValueError("pooling='cls' needs use_cls_token=True")
            pooled = x[:, 0]
            out["pooled"] = fc_norm(pooled) if fc_norm is not None else pooled
        elif self.pooling == "mean":
            pooled = patches.mean(axis=1)
            out["pooled"] = fc_norm(pooled) if fc_norm is not None else pooled
        if self.num_classes > 0:
            if self.pooling == "none":
                raise ValueError("num_classes > 0 needs pooling 'cls' or 'mean'")
            out["logits"] = Dense(self.num_classes, names=("embed", "vocab"), use_bias=self.head_bias,
                                  init_std=self.init_std, init_truncation=self.init_truncation,
                                  kernel_scale=self.head_init_scale, dtype=self.dtype, name="head")(out["pooled"])
        if return_blocks:
            out["blocks"] = tuple(blocks)
        return out


class ShareRelPosTable(nn.Module):
    """The shared relative position bias table ``[(2H−1)(2W−1)+3, heads]``, zero-initialised."""

    window: tuple
    num_heads: int

    @nn.compact
    def __call__(self) -> jax.Array:
        return _param(self, "relative_position_bias_table", nn.initializers.zeros,
                      (relpos.num_relative_distance(self.window), self.num_heads), (None, "heads"))
