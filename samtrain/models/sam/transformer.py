"""SAM's two-way transformer: prompt tokens and image embedding attend to each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samtrain.models.common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by downsample_rate."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the attention width {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C / heads)."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q_pos: torch.Tensor | None = None,
        k_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C). k, v may broadcast over B.

        q_pos, k_pos: a positional encoding already projected by this attention
        (:meth:`project_q_pos`, :meth:`project_k_pos`), added to the projected q and k. The
        projection is linear, so this is attention over ``q + pe`` and ``k + pe``; an encoding
        shared by every mask (the image's) then costs one small matmul, not an add on every mask's
        image tokens, and one for many calls when it is projected once and passed to each.
        """
        q = self._split_heads(_add(self.q_proj(q), q_pos))
        k = self._split_heads(_add(self.k_proj(k), k_pos))
        v = self._split_heads(self.v_proj(v))
        b = max(q.shape[0], k.shape[0], v.shape[0])
        q, k, v = (t.expand(b, *t.shape[1:]) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).flatten(2)
        return self.out_proj(out)

    def project_q_pos(self, pe: torch.Tensor) -> torch.Tensor:
        """(..., C) positional encoding -> (..., C'), as q_proj maps it (without the bias)."""
        return F.linear(pe, self.q_proj.weight)

    def project_k_pos(self, pe: torch.Tensor) -> torch.Tensor:
        """(..., C) positional encoding -> (..., C'), as k_proj maps it (without the bias)."""
        return F.linear(pe, self.k_proj.weight)


def _add(x: torch.Tensor, term: torch.Tensor | None) -> torch.Tensor:
    return x if term is None else x + term


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image cross-attention, MLP, image-to-token cross-attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pos: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, T, C) tokens with their positional encoding query_pe (B, T, C); keys (B, HW, C)
        image tokens, whose positional encoding comes projected (:meth:`project_image_pe`)."""
        to_image_keys, to_token_queries = key_pos
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        attn = self.cross_attn_token_to_image(queries + query_pe, keys, keys, k_pos=to_image_keys)
        queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))

        attn = self.cross_attn_image_to_token(keys, queries + query_pe, queries, q_pos=to_token_queries)
        keys = self.norm4(keys + attn)
        return queries, keys

    def project_image_pe(self, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image positional encoding (..., HW, C) as this block's attentions read it: the
        token-to-image keys' and the image-to-token queries' projections."""
        return self.cross_attn_token_to_image.project_k_pos(pe), self.cross_attn_image_to_token.project_q_pos(
            pe
        )


class TwoWayTransformer(nn.Module):
    """A stack of two-way attention blocks, then a final token-to-image attention."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                activation,
                attention_downsample_rate,
                skip_first_layer_pe=i == 0,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def project_image_pe(self, image_pe: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """image_pe (1, C, h, w) -> its projection by every attention that reads the image tokens,
        each (1, hw, C'): two per block (:meth:`TwoWayAttentionBlock.project_image_pe`), then the
        final attention's keys. It depends on nothing but the weights, so many calls with the same
        weights (the decoder passes of a training step) can share one."""
        pe = image_pe.flatten(2).transpose(1, 2)
        per_block = [term for layer in self.layers for term in layer.project_image_pe(pe)]
        return (*per_block, self.final_attn_token_to_image.project_k_pos(pe))

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor | None,
        point_embedding: torch.Tensor,
        *,
        image_pos: tuple[torch.Tensor, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding (B, C, h, w), image_pe (1 or B, C, h, w), point_embedding (B, T, C).

        image_pos: ``project_image_pe(image_pe)`` when already computed; image_pe is then unused.
        Returns the processed tokens (B, T, C) and image features (B, hw, C).
        """
        if image_pos is None:
            image_pos = self.project_image_pe(image_pe)
        keys = image_embedding.flatten(2).transpose(1, 2)
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            queries, keys = layer(queries, keys, point_embedding, key_pos=image_pos[2 * i : 2 * i + 2])
        attn = self.final_attn_token_to_image(queries + point_embedding, keys, keys, k_pos=image_pos[-1])
        queries = self.norm_final_attn(queries + attn)
        return queries, keys
