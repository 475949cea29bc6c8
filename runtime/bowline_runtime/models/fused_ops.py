"""The small per-layer operations of a Llama-family decoder, behind one interface a device can speed up.

`FusedOps` is the reference, in plain torch, and what every device runs unless it offers better
(the CPU's C versions are in bowline_runtime.kernels.cpu). The arithmetic follows transformers'
modules exactly (RMSNorm in float32, then the weight in the activation dtype; rotary in its
"rotate half" form), so the packed decoder gives transformers' own numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FusedOps:
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, H] -> weight * x / rms(x), as transformers' LlamaRMSNorm computes it."""
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """residual += x (in place); returns rms_norm(residual): one block's output joins the stream,
        the next block's input is normalised from it."""
        residual.add_(x)
        return self.rms_norm(residual, weight, eps)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, the gated MLP's activation."""
        return F.silu(gate) * up

    def silu_mul_halves(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`silu_mul` of a fused gate/up product [T, 2F], gate first: one call instead of a chunk and a call."""
        gate, up = gate_up.chunk(2, dim=-1)
        return self.silu_mul(gate, up)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate x [T, heads, D] in place by its positions' cos/sin [T, rot_dim] ("rotate half" form;
        dimensions past rot_dim, if any, are left alone)."""
        rot = cos.shape[-1]
        half = rot // 2
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        part = x[..., :rot]
        rotated = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
        part.copy_(part * c + rotated * s)
