"""A GPT-style causal transformer over a tokenizer's flattened token grid (LlamaGen's recipe, small).

The sequence of one image is ``[c, t_0, t_1, ..., t_{L-1}]``: ``c`` is a class embedding (a table of
``num_classes + 1`` rows; row ``num_classes`` is "no class", used by unconditional priors for every image and
by class-conditional ones for classifier-free guidance), ``t_i`` the tokens of the ``h x w`` grid in raster
order. Position ``i`` predicts token ``t_i``, so ``L`` outputs predict the whole grid.

Blocks are pre-norm (RMSNorm) attention + SwiGLU MLP, as in LlamaGen / LLaMA. Positions are rotary (RoPE, 1-D
over the sequence index; the class token is position 0) or a learned table. A :class:`KVCache` keeps each
layer's keys and values so sampling processes one new token per step instead of the whole prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

POSITIONS = ("rope", "learned")


def ffn_hidden_size(width: int, multiple_of: int) -> int:
    """SwiGLU hidden width: 2/3 of 4*width (same parameters as a 4x GELU MLP), rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * width / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def rope_tables(length: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` tables ``(length, head_dim)`` for rotate-half RoPE."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, heads, T, head_dim)`` by the angles of its positions (``cos``/``sin`` ``(T, head_dim)``)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    """Keys and values of every layer, ``(B, heads, max_len, head_dim)`` each, filled up to ``length``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.dropout = dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.keys[layer][:, :, start : start + t] = k
            cache.values[layer][:, :, start : start + t] = v
            k = cache.keys[layer][:, :, : start + t]
            v = cache.values[layer][:, :, : start + t]
        # one new query attends to every cached key: no mask needed; a block of queries needs the causal mask,
        # which is only the plain lower-triangular one when the block starts at position 0
        if t > 1 and start != 0:
            raise ValueError("a block of several new tokens must start at position 0")
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=t > 1, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-5)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.RMSNorm(width, eps=1e-5)
        self.mlp = SwiGLU(width, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, start=0):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, cache, layer, start))
        return x + self.drop(self.mlp(self.norm2(x)))


class TokenPrior(nn.Module):
    """Autoregressive prior over ``grid = (h, w)`` tokens of a codebook of ``codebook_size`` codes.

    Args:
        codebook_size: K, the tokenizer's number of codes (vocabulary; any K up to 262,144).
        grid: token grid ``(h, w)``; the sequence length is ``h * w``.
        num_classes: 0 for an unconditional prior; otherwise class ids ``0 .. num_classes - 1``.
        width, depth, heads: transformer size (LlamaGen-B: 768, 12, 12).
        positions: ``"rope"`` (rotary, default) or ``"learned"``.
        label_dropout: probability that a training label is replaced by "no class" (classifier-free guidance).
        dropout: attention / residual dropout.
        ffn_multiple_of: the SwiGLU hidden width is rounded up to a multiple of this (LlamaGen: 256).
    """

    def __init__(
        self,
        *,
        codebook_size: int,
        grid: tuple[int, int] | list[int],
        num_classes: int = 0,
        width: int = 256,
        depth: int = 4,
        heads: int = 4,
        positions: str = "rope",
        rope_base: float = 10000.0,
        label_dropout: float = 0.1,
        dropout: float = 0.0,
        ffn_multiple_of: int = 64,
    ) -> None:
        super().__init__()
        if not (isinstance(codebook_size, int) and 2 <= codebook_size <= 262_144):
            raise ValueError(f"codebook_size must be an integer in [2, 262144], got {codebook_size!r}")
        if len(grid) != 2 or any(int(g) < 1 for g in grid):
            raise ValueError(f"grid must be (h, w) with positive sides, got {grid!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if width % heads or (width // heads) % 2:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads}) into an even head size")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.codebook_size = codebook_size
        self.grid = (int(grid[0]), int(grid[1]))
        self.seq_len = self.grid[0] * self.grid[1]
        self.num_classes = num_classes
        self.null_class = num_classes
        self.width, self.depth, self.heads = width, depth, heads
        self.positions = positions
        self.label_dropout = label_dropout
        self.token_embedding = nn.Embedding(codebook_size, width)
        self.class_embedding = nn.Embedding(num_classes + 1, width)
        if positions == "learned":
            self.position_embedding = nn.Parameter(torch.zeros(self.seq_len, width))
            nn.init.normal_(self.position_embedding, std=0.02)
        else:
            cos, sin = rope_tables(self.seq_len, width // heads, rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        hidden = ffn_hidden_size(width, ffn_multiple_of)
        self.blocks = nn.ModuleList(Block(width, heads, hidden, dropout) for _ in range(depth))
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.head = nn.Linear(width, codebook_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: scale the residual projections by depth
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * depth))
            nn.init.normal_(block.mlp.w2.weight, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the token embedding (K x width), the output layer (width x K), and the rest."""
        total = sum(p.numel() for p in self.parameters())
        emb, out = self.token_embedding.weight.numel(), self.head.weight.numel()
        return {"token_embedding": emb, "output_layer": out, "transformer": total - emb - out, "total": total}

    def labels_or_null(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """Class ids ``(B,)``; None (or an unconditional prior) gives the "no class" row for every item."""
        if labels is None or not self.conditional:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long)
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        if bool(((labels < 0) | (labels > self.null_class)).any()):
            raise ValueError(f"class ids must be in [0, {self.num_classes - 1}] (or {self.null_class} = no class)")
        return labels

    def _positions(self, start: int, length: int):
        if self.positions == "rope":
            return self.rope_cos[start : start + length], self.rope_sin[start : start + length]
        return None, None

    def _run(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        t = x.shape[1]
        if self.positions == "learned":
            x = x + self.position_embedding[start : start + t]
        cos, sin = self._positions(start, t)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, start)
        return self.head(self.norm(x))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T + 1, K)`` for the tokens after a prefix ``tokens`` ``(B, T)``, ``0 <= T < L``.

        Position ``i`` of the output predicts token ``i``. For training pass ``seq[:, :-1]`` (the full grid
        minus its last token) and compare with ``seq``. Label dropout applies in training mode.
        """
        b, t = tokens.shape
        if t >= self.seq_len:
            raise ValueError(f"a prefix of at most {self.seq_len - 1} tokens predicts the grid; got {t}")
        labels = self.labels_or_null(labels, b, tokens.device)
        if self.training and self.conditional and self.label_dropout > 0:
            drop = torch.rand(b, device=tokens.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        x = torch.cat([self.class_embedding(labels)[:, None], self.token_embedding(tokens)], dim=1)
        return self._run(x, 0, None)

    def loss(self, sequences: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats per token of ``sequences`` ``(B, L)`` (or ``(B, h, w)``)."""
        seq = sequences.reshape(sequences.shape[0], -1)
        logits = self(seq[:, :-1], labels)
        return F.cross_entropy(logits.reshape(-1, self.codebook_size).float(), seq.reshape(-1))

    # ----- incremental decoding -----------------------------------------------------------------------
    def new_cache(self, batch: int, *, device=None, dtype=None) -> KVCache:
        ref = self.head.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        shape = (batch, self.heads, self.seq_len, self.width // self.heads)
        return KVCache(
            keys=[torch.empty(shape, device=device, dtype=dtype) for _ in range(self.depth)],
            values=[torch.empty(shape, device=device, dtype=dtype) for _ in range(self.depth)],
        )

    def start(self, labels: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed the class tokens ``(B,)`` (already resolved, "no class" included); logits ``(B, K)`` for token 0."""
        cache.length = 0
        x = self.class_embedding(labels)[:, None]
        logits = self._run(x, 0, cache)
        cache.length = 1
        return logits[:, -1]

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row ``(B,)``; logits ``(B, K)`` for the next position."""
        pos = cache.length
        if pos >= self.seq_len:
            raise ValueError("the cache is full: the grid is complete")
        logits = self._run(self.token_embedding(tokens)[:, None], pos, cache)
        cache.length = pos + 1
        return logits[:, -1]


__all__ = ["KVCache", "POSITIONS", "TokenPrior", "apply_rope", "ffn_hidden_size", "rope_tables"]
