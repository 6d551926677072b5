"""Small layers shared by the prompt encoder and the mask decoder."""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """The transformer feed-forward block: lin1 -> activation -> lin2."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """A stack of linear layers with ReLU between them (the IoU head and the hypernetworks)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


def batched_mlp(mlps: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Run K structurally identical MLPs, the k-th on x[:, k], as batched matmuls.

    x: (N, K, C_in) -> (N, K, C_out). Equivalent to stacking ``mlps[k](x[:, k])`` but one
    einsum per layer instead of K small matmuls.
    """
    num_layers = len(mlps[0].layers)
    for i in range(num_layers):
        weight = torch.stack([mlp.layers[i].weight for mlp in mlps])  # (K, out, in)
        bias = torch.stack([mlp.layers[i].bias for mlp in mlps])  # (K, out)
        x = torch.einsum("nki,koi->nko", x, weight) + bias
        if i < num_layers - 1:
            x = torch.relu(x)
    return x
