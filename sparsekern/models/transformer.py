"""Transformer encoders whose every projection is a plain nn.Linear (the ViT patch projection an
nn.Conv2d), so ``sparsify`` swaps them all: a BERT-style text classifier (post-LN) and a ViT (pre-LN).

Layer names and order follow BERT and ViT (query, key, value and output projections of width
``hidden``, a GELU feed-forward), so their parameter counts are those of the published models.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SelfAttention", "EncoderLayer", "BertEncoder", "VisionTransformer"]


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with separate query, key, value and output projections."""

    def __init__(self, hidden: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"SelfAttention: hidden ({hidden}) must be a multiple of heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, h = x.shape

        def heads(proj: nn.Module) -> torch.Tensor:
            return proj(x).view(b, t, self.heads, h // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(heads(self.query), heads(self.key), heads(self.value), attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, h))


class EncoderLayer(nn.Module):
    """Self-attention and a GELU feed-forward (``fc1``, ``act``, ``fc2``), each a residual branch; LayerNorm after
    each residual sum (BERT) or, with ``norm_first``, on each branch's input (ViT)."""

    fusable_activations = (("fc1", "act"),)  # act applies to fc1's output alone (sparsekern.fuse_activations)

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float = 0.0, norm_first: bool = False,
                 eps: float = 1e-12):
        super().__init__()
        self.attn = SelfAttention(hidden, heads, dropout)
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.fc1 = nn.Linear(hidden, ffn)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.norm_first = norm_first

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.norm_first:
            x = x + self.drop(self.attn(self.norm1(x), attn_mask))
            return x + self._ffn(self.norm2(x))
        x = self.norm1(x + self.drop(self.attn(x, attn_mask)))
        return self.norm2(x + self._ffn(x))


class BertEncoder(nn.Module):
    """BERT-style sequence classifier: word + position + segment embeddings, LayerNorm, post-LN encoder
    layers, a tanh pooler on the first token and a linear classifier; BERT's initialization (normal,
    std 0.02). Defaults: BERT-Small (4 layers, hidden 512, 8 heads, FFN 2048, BERT's vocabulary).

    ``forward(input_ids, attention_mask=None, token_type_ids=None)``: ids of shape (batch, seq);
    ``attention_mask`` (batch, seq) is 1 (or True) for the tokens to attend to.
    """

    def __init__(self, num_classes: int = 2, vocab_size: int = 30522, hidden: int = 512, layers: int = 4,
                 heads: int = 8, ffn: int = 2048, max_len: int = 512, type_vocab_size: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(max_len, hidden)
        self.segment = nn.Embedding(type_vocab_size, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn, dropout) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.position.num_embeddings:
            raise ValueError(f"BertEncoder: input_ids must have at most {self.position.num_embeddings} tokens "
                             f"(max_len), got {t}")
        x = self.word(input_ids) + self.position.weight[:t]
        x = x + (self.segment.weight[0] if token_type_ids is None else self.segment(token_type_ids))
        x = self.drop(self.norm(x))
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, mask)
        return self.classifier(self.drop(torch.tanh(self.pooler(x[:, 0]))))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021): a conv projection of ``patch_size`` patches (kernel = stride), a class
    token, learned position embeddings, pre-LN encoder layers, a final LayerNorm and a linear head on the
    class token. Defaults: ViT-S/16 (12 layers, hidden 384, 6 heads, MLP 1536) at 224x224."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, patch_size: int = 16,
                 hidden: int = 384, layers: int = 12, heads: int = 6, mlp: int = 1536, dropout: float = 0.0,
                 eps: float = 1e-6):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"VisionTransformer: image_size ({image_size}) must be a multiple of patch_size "
                             f"({patch_size})")
        self.image_size = image_size
        self.patch = nn.Conv2d(in_channels, hidden, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.position = nn.Parameter(torch.empty(1, (image_size // patch_size) ** 2 + 1, hidden))
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, mlp, dropout, norm_first=True, eps=eps)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.head = nn.Linear(hidden, num_classes)
        nn.init.trunc_normal_(self.position, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # the reference implementation's Dense init
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"VisionTransformer: x must be {self.image_size}x{self.image_size} images (the position "
                             f"embeddings' grid), got {tuple(x.shape[-2:])}")
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.drop(torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.position)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])

