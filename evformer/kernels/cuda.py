"""The CUDA kernel set: Triton for the two LIF passes, torch ops for the rest.

Triton is imported on the first LIF call only, so this module (and the interface test)
loads where Triton is not installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evformer.kernels.types import LIFParams

__all__ = ["TritonKernels"]


class TritonKernels:
    """CUDA kernel set: Triton for the LIF passes, torch ops for the rest; implements
    :class:`~evformer.kernels.interface.KernelSet` (no event-driven products)."""

    name = "triton"
    event_driven = False

    @staticmethod
    def bn_lif_forward(y3, scale, shift, p: LIFParams, want_packed: bool):
        from evformer.kernels import triton_lif as TK

        return TK.bn_lif_forward(y3, scale, shift, p, want_packed)

    @staticmethod
    def bn_lif_backward(y3, scale, shift, mean, gs3, p: LIFParams, out=None):
        from evformer.kernels import triton_lif as TK

        # the Triton kernel parks H in the output buffer, so it must not alias grad_s
        return TK.bn_lif_backward(y3, scale, shift, mean, gs3, p)

    @staticmethod
    def affine_backward_apply(y2, gz2, mean, a, b, d, out):
        torch.addcmul(d.to(y2.dtype), gz2, a.to(y2.dtype), out=out)
        out.add_((y2 - mean.to(y2.dtype)) * b.to(y2.dtype))
        return out

    @staticmethod
    def channel_stats(y2):
        var, mean = torch.var_mean(y2.double(), dim=0, correction=0)
        return mean, var

    @staticmethod
    def maxpool_backward(s_nhwc, g_nhwc, kernel: int, stride: int, pad: int):
        s = s_nhwc.permute(0, 3, 1, 2).to(g_nhwc.dtype)
        g = g_nhwc.permute(0, 3, 1, 2)
        _, idx = F.max_pool2d(s, kernel, stride, pad, return_indices=True)
        gin = torch.ops.aten.max_pool2d_with_indices_backward(
            g, s, [kernel, kernel], [stride, stride], [pad, pad], [1, 1], False, idx
        )
        return gin.permute(0, 2, 3, 1).contiguous()

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor | None:
        if not x.is_contiguous():
            return None
        u = x.detach().clamp(0, 255).to(torch.uint8)
        if not torch.equal(u.to(x.dtype), x.detach()):
            return None
        return u

    @staticmethod
    def unpack(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype)
