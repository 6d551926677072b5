"""Per-pass decoder backward: each decoder pass of a step backpropagated as soon as its loss is
known, so only one pass's activations are alive at a time, with nothing recomputed."""

from __future__ import annotations

import torch

from samtrain.models.sam.mask_decoder import DecoderImage


class PerPassBackward:
    """Backpropagates each decoder pass as soon as its loss is known, so that only one pass's
    activations are alive at a time, with no recomputation.

    The passes read the prepared image (its embeddings and projected positional encoding)
    through detached leaves. Each pass's gradients (of the trainable decoder-side parameters and
    of those leaves) are added up with ``torch.autograd.grad``, which leaves ``.grad`` and DDP's
    hooks untouched; :meth:`surrogate` then returns a scalar whose gradient is exactly their sum,
    so the one backward pass that Lightning runs (DDP's reduction, clipping, accumulation as
    usual) also carries the share of the encoder and of the positional projections.
    """

    def __init__(self, params, image: DecoderImage, weight: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.prepared = [t for t in image.tensors() if t.requires_grad]
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in image.tensors()]
        self.image = type(image).from_tensors(leaves)
        self.inputs = self.params + [t for t in leaves if t.requires_grad]
        self.sums = [torch.zeros_like(t) for t in self.inputs]
        self.weight = weight

    def backward(self, loss: torch.Tensor) -> None:
        """Adds the gradients of ``weight * loss`` and frees the pass's graph."""
        grads = torch.autograd.grad(loss * self.weight, self.inputs, allow_unused=True)
        for total, grad in zip(self.sums, grads, strict=True):
            if grad is not None:
                total.add_(grad)

    def surrogate(self) -> torch.Tensor:
        """A scalar whose gradient is the summed gradients (its value means nothing)."""
        through = self.params + self.prepared
        return torch.stack([(t * g).sum() for t, g in zip(through, self.sums, strict=True)]).sum()
