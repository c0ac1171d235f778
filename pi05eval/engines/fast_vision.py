"""SigLIP's stage of the fast path (`FastPi05.vision`), with the vision shortcuts of `Shortcuts`.

`fuse_vision_qkv` (Q, K, V with biases as one GEMM), `pad_vision_mlp` (the MLP's hidden size zero-padded to a
multiple of 128), `gelu_epilogue` (fc1 + bias + tanh-GELU as one cuBLASLt call on CUDA) and `patch_gemm` (the
stride-14 patch convolution as one GEMM over the flattened patches). Each applies only where the layers it rewrites
are plain float modules; quantized ones (`pi05eval/precision/linear.py`, ModelOpt's) keep their own forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pi05eval.model.pi05 import Pi05Model

if TYPE_CHECKING:
    from pi05eval.engines.fast import Shortcuts


def mlp_weights(mlp: torch.nn.Module, multiple: int) -> tuple[torch.Tensor, ...] | None:
    """(fc1 weight [Hp, D], fc1 bias [Hp], fc2 weight [D, Hp], fc2 bias [D]) with the hidden size H zero-padded to Hp,
    the next multiple of `multiple` (1: as they are); None unless fc1 and fc2 are plain nn.Linear with biases."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    if any(type(f) is not torch.nn.Linear or f.bias is None for f in (fc1, fc2)):
        return None
    hidden = fc1.out_features
    padded = -(-hidden // multiple) * multiple
    with torch.no_grad():
        if padded == hidden:
            return fc1.weight.detach(), fc1.bias.detach(), fc2.weight.detach(), fc2.bias.detach()
        w1 = fc1.weight.new_zeros(padded, fc1.in_features)
        w1[:hidden] = fc1.weight
        b1 = fc1.bias.new_zeros(padded)
        b1[:hidden] = fc1.bias
        w2 = fc2.weight.new_zeros(fc2.out_features, padded)
        w2[:, :hidden] = fc2.weight
    return w1, b1, w2, fc2.bias.detach()


def patch_weight(conv: torch.nn.Module) -> torch.Tensor | None:
    """The patch embedding's weight as [D, 3 * p * p], or None unless it is a plain square convolution with a bias,
    stride = kernel and no padding (non-overlapping patches)."""
    if type(conv) is not torch.nn.Conv2d or conv.bias is None or conv.padding != (0, 0):
        return None
    if conv.stride != conv.kernel_size or conv.kernel_size[0] != conv.kernel_size[1]:
        return None
    return conv.weight.detach().reshape(conv.out_channels, -1)


class FastVision:
    """images [B, N_kept, 3, S, S] -> image tokens [B, N_kept * T, width] (compute dtype), as `embed_images`."""

    def __init__(self, model: Pi05Model, shortcuts: Shortcuts) -> None:
        self.model = model
        self.gelu_epilogue = shortcuts.gelu_epilogue
        layers = model.vision.layers
        self.qkv = None  # per SigLIP layer, one module computing [q | k | v]
        if shortcuts.fuse_vision_qkv:
            from pi05eval.precision.linear import fuse_linears

            fused = [fuse_linears([x.attn.q_proj, x.attn.k_proj, x.attn.v_proj]) for x in layers]
            self.qkv = fused if all(f is not None for f in fused) else None
        self.mlp = None  # per SigLIP layer, (fc1 w, fc1 b, fc2 w, fc2 b), the hidden size padded if asked
        if shortcuts.pad_vision_mlp or shortcuts.gelu_epilogue:
            weights = [mlp_weights(x.mlp, 128 if shortcuts.pad_vision_mlp else 1) for x in layers]
            self.mlp = weights if all(w is not None for w in weights) else None
        # [D, 3 * p * p]: the patch embedding as a GEMM over flattened patches
        self.patch_weight = patch_weight(model.vision.patch_embed) if shortcuts.patch_gemm else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        m, enc = self.model, self.model.vision
        if self.qkv is None and self.mlp is None and self.patch_weight is None:
            return m.embed_images(images)
        b, n = images.shape[:2]
        x = (self._patch_embed(images.flatten(0, 1)) + enc.pos_embed).to(enc.compute_dtype)  # [B*N, T, D]
        for i, layer in enumerate(enc.layers):
            h = layer.norm1(x)
            if self.qkv is None:
                x = x + layer.attn(h)
            else:
                nt, t, d = x.shape
                heads = layer.attn.heads
                qkv = self.qkv[i](h).view(nt, t, 3, heads, d // heads)
                q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B*N, h, T, hd]
                att = F.scaled_dot_product_attention(q, k, v, scale=(d // heads) ** -0.5)
                x = x + layer.attn.o_proj(att.transpose(1, 2).reshape(nt, t, d))
            h = layer.norm2(x)
            x = x + (layer.mlp(h) if self.mlp is None else self._mlp(self.mlp[i], h))
        tokens = m.projector(enc.norm(x))  # [B*N, T, width]
        return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])

    def _patch_embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S] -> patch embeddings [N, T, D] in the convolution's dtype."""
        conv = self.model.vision.patch_embed
        pixels = pixels.to(conv.weight.dtype)
        if self.patch_weight is None:
            return conv(pixels).flatten(2).transpose(1, 2)
        n, c, size, _ = pixels.shape
        p = conv.kernel_size[0]
        g = size // p  # patches per side
        patches = pixels.view(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, c * p * p)  # [N*T, 3pp]
        return torch.addmm(conv.bias, patches, self.patch_weight.t()).view(n, g * g, -1)

    def _mlp(self, weights: tuple[torch.Tensor, ...], h: torch.Tensor) -> torch.Tensor:
        """SigLIP's MLP on h [B*N, T, D] with the (possibly padded) weights of `mlp_weights`."""
        w1, b1, w2, b2 = weights
        if self.gelu_epilogue and h.is_cuda:  # aten's CPU kernel would apply the erf GELU
            a = torch._addmm_activation(b1, h.flatten(0, -2), w1.t(), use_gelu=True).view(*h.shape[:-1], -1)
        else:
            a = F.gelu(F.linear(h, w1, b1), approximate="tanh")  # [B*N, T, hidden]
        return F.linear(a, w2, b2)
