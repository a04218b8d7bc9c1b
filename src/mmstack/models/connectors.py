"""Connectors: map a vision encoder's tokens into a language model's embedding space.

- ``MlpProjector``: LLaVA-1.5's two-layer MLP with GELU, one output token per visual token. Its parameter
  names (``linear_1``, ``linear_2``) are those of HF ``LlavaMultiModalProjector``, so weights move between
  the two unchanged.
  With ``input_norm`` a LayerNorm comes first (InternVL's projector, Qwen2-VL's patch merger): it evens out
  vision features whose raw hidden states carry a large shared offset or widely varying norms.
  With ``standardize`` each feature dimension is first standardised with a fixed mean and std measured once on
  training images (``set_feature_stats``, as a BatchNorm in eval mode, or the standardisation in front of a
  linear probe): a frozen CLIP's hidden states share a large common direction, which otherwise swamps the
  differences between tokens at the MLP's input. Being affine, it folds into ``linear_1`` for HF export.
- ``PerceiverResampler``: Flamingo's resampler. ``M`` learned queries cross-attend to the ``N`` visual
  tokens (and to themselves) for a few layers, so any number of visual tokens is compressed to ``M``.
  The language model's sequence, and with it prefill cost, no longer grows with the image resolution.
- ``GridPositionEmbedding``: learned row and column embeddings added to the MLP's output tokens, so the
  language model can find "the object at the top left" by matching a position it reads directly, instead
  of one the vision tower's features carry only implicitly (Qwen2-VL gives its LM 2-D positions with M-RoPE;
  this is the additive, HF-Llama-compatible variant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmstack.errors import ConfigError


@dataclass
class ConnectorConfig:
    """Which connector joins vision and language, and its size.

    Args:
        type: ``"mlp"`` (LLaVA, one token per visual token) or ``"resampler"`` (Perceiver, ``num_queries`` out).
        num_queries: tokens the resampler outputs per image view.
        depth, heads, width: resampler layers, attention heads, and inner width (0: the vision width).
        act: the MLP's activation (``"gelu"``, as LLaVA).
        bias: biases in the MLP's linear layers (HF ``multimodal_projector_bias``).
        input_norm: a LayerNorm over the visual features before the MLP (InternVL, Qwen2-VL); such a
            model has no HF Llava equivalent.
        standardize: standardise each visual feature dimension with statistics measured on training images
            before the MLP (the recipe measures them when a stage first trains the connector).
        position_embedding: add learned 2-D (row + column) embeddings to the MLP's output tokens
            (``GridPositionEmbedding``); such a model has no HF Llava equivalent.
        max_grid: rows and columns of patches the position embedding covers.
    """

    type: Literal["mlp", "resampler"] = "mlp"
    num_queries: int = 16
    depth: int = 2
    heads: int = 4
    width: int = 0
    act: str = "gelu"
    bias: bool = True
    input_norm: bool = False
    standardize: bool = False
    position_embedding: bool = False
    max_grid: int = 32

    def __post_init__(self) -> None:
        if self.type not in ("mlp", "resampler"):
            raise ConfigError(f"connector.type must be 'mlp' or 'resampler', got {self.type!r}")
        for name in ("num_queries", "depth", "heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"connector.{name} must be > 0, got {getattr(self, name)}")
        if self.width < 0:
            raise ConfigError(f"connector.width must be >= 0 (0 = the vision width), got {self.width}")
        if self.width and self.width % self.heads:
            raise ConfigError(f"connector.width={self.width} must be divisible by connector.heads={self.heads}")
        if self.position_embedding and self.type != "mlp":
            raise ConfigError("connector.position_embedding needs type 'mlp' (a resampler's queries have no grid)")
        if self.standardize and self.type != "mlp":
            raise ConfigError("connector.standardize needs type 'mlp' (the resampler normalises its inputs already)")
        if self.input_norm and self.type != "mlp":
            raise ConfigError("connector.input_norm needs type 'mlp' (the resampler normalises its inputs already)")
        if self.max_grid <= 0:
            raise ConfigError(f"connector.max_grid must be > 0, got {self.max_grid}")
        if self.act not in _ACTS:
            raise ConfigError(f"connector.act must be one of {sorted(_ACTS)}, got {self.act!r}")


_ACTS = {"gelu": nn.GELU, "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU, "silu": nn.SiLU}


class MlpProjector(nn.Module):
    """LLaVA-1.5's projector: ``linear_2(gelu(linear_1(x)))``, (B, N, D_vision) -> (B, N, D_text); with
    ``input_norm``, ``x`` is layer-normalised first."""

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        act: str = "gelu",
        bias: bool = True,
        input_norm: bool = False,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.standardize = standardize
        if standardize:  # identity until set_feature_stats; saved with the weights
            self.register_buffer("feature_mean", torch.zeros(vision_dim))
            self.register_buffer("feature_std", torch.ones(vision_dim))
            self.register_buffer("stats_measured", torch.zeros((), dtype=torch.bool))
        self.norm = nn.LayerNorm(vision_dim) if input_norm else None
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.act = _ACTS[act]()
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def num_tokens(self, n_visual: int) -> int:
        """Output tokens for ``n_visual`` input tokens (one each)."""
        return n_visual

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Fix the standardisation from (N, D_vision) sample features: per-dimension mean and std."""
        if not self.standardize:
            raise ConfigError("this connector was built with connector.standardize: false; it has no feature stats")
        if features.ndim != 2 or features.shape[0] < 2:
            raise ConfigError(f"feature stats need (N >= 2, D) features, got shape {tuple(features.shape)}")
        features = features.float()
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6))
        self.stats_measured.fill_(True)

    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of an equivalent plain MLP (HF ``LlavaMultiModalProjector``): the standardisation
        ``(x - m) / s`` folded into ``linear_1`` as ``W / s`` and ``b - (W / s) m``."""
        if self.norm is not None:
            raise ConfigError("a connector with input_norm has no plain-MLP equivalent")
        state = {k: v for k, v in self.state_dict().items() if k.startswith(("linear_1.", "linear_2."))}
        if self.standardize:
            if self.linear_1.bias is None:
                raise ConfigError("folding connector.standardize into linear_1 needs connector.bias: true")
            weight = self.linear_1.weight / self.feature_std  # (D_t, D_v), column j scaled by 1 / s_j
            state["linear_1.weight"] = weight
            state["linear_1.bias"] = self.linear_1.bias - weight @ self.feature_mean
        return state

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            features = (features - self.feature_mean.to(features.dtype)) / self.feature_std.to(features.dtype)
        if self.norm is not None:
            features = self.norm(features)
        return self.linear_2(self.act(self.linear_1(features)))


class _CrossAttentionBlock(nn.Module):
    """Queries attend to [visual tokens; queries] (Flamingo), then a feed-forward layer; pre-norm residuals."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_query = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        b, m, d = queries.shape
        q_in = self.norm_query(queries)
        # Keys include the queries themselves so a query can keep what it has gathered (Flamingo's choice).
        context = torch.cat([self.norm_media(media), q_in], dim=1)  # (B, N + M, D)
        q = self.q(q_in).view(b, m, self.heads, -1).transpose(1, 2)  # (B, H, M, d)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, N+M, d)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, m, d)  # (B, M, D)
        queries = queries + self.out(attended)
        return queries + self.ff(queries)


class PerceiverResampler(nn.Module):
    """Compress N visual tokens to ``num_queries`` tokens: (B, N, D_vision) -> (B, M, D_text).

    Visual tokens are first projected to the resampler width; ``M`` learned queries then run ``depth``
    cross-attention blocks over them; a final norm and linear layer map to the language model's width.
    """

    def __init__(self, vision_dim: int, text_dim: int, num_queries: int, depth: int, heads: int, width: int = 0):
        super().__init__()
        width = width or vision_dim
        if width % heads:
            raise ConfigError(f"resampler width {width} must be divisible by connector.heads={heads}")
        self.num_queries = num_queries
        self.proj_in = nn.Linear(vision_dim, width)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * width**-0.5)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, text_dim)

    def num_tokens(self, n_visual: int) -> int:
        """Output tokens for any number of input tokens: always ``num_queries``."""
        return self.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        media = self.proj_in(features)  # (B, N, W)
        x = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)  # (B, M, W)
        for block in self.blocks:
            x = block(x, media)
        return self.proj_out(self.norm(x))  # (B, M, D_text)


class GridPositionEmbedding(nn.Module):
    """Learned 2-D positions for a patch grid: ``row[r] + col[c]`` added to token ``r * gw + c``."""

    def __init__(self, max_grid: int, dim: int) -> None:
        super().__init__()
        self.row = nn.Parameter(torch.randn(max_grid, dim) * 0.02)
        self.col = nn.Parameter(torch.randn(max_grid, dim) * 0.02)

    def forward(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """Add positions to (V, [1 +] gh * gw, D) tokens; a leading extra token (CLS) gets none."""
        max_grid = self.row.shape[0]
        if max(grid_h, grid_w) > max_grid:
            raise ConfigError(
                f"a {grid_h}x{grid_w} patch grid exceeds connector.max_grid={max_grid}: "
                "use smaller images (processor max_tokens) or a model built with a larger max_grid"
            )
        pos = (self.row[:grid_h, None] + self.col[None, :grid_w]).flatten(0, 1)  # (gh * gw, D)
        extra = tokens.shape[1] - pos.shape[0]
        if extra:
            pos = torch.cat([pos.new_zeros(extra, pos.shape[1]), pos])
        return tokens + pos.to(tokens.dtype)


def build_connector(cfg: ConnectorConfig, vision_dim: int, text_dim: int) -> MlpProjector | PerceiverResampler:
    """The connector named by ``cfg`` between widths ``vision_dim`` and ``text_dim``."""
    if cfg.type == "mlp":
        return MlpProjector(vision_dim, text_dim, cfg.act, cfg.bias, cfg.input_norm, cfg.standardize)
    return PerceiverResampler(vision_dim, text_dim, cfg.num_queries, cfg.depth, cfg.heads, cfg.width)
