"""Quantization-aware training: every Linear the deployed format quantizes computes with its weight
rounded as that format will round it, so that training adapts to the file's error.

The rounding must be the deployed format's exactly. Users who trained with torchao's own int4 fake
quantizer (a scale of amax / 7.5 kept in fp32, round half to even) and deployed a llama.cpp Q4_0
file saw no gain (torchtune#2845, pytorch/ao#2419): Q4_0 rounds otherwise. So the rounding here is
our own, plugged into torchao's fake-quantized Linear as a torchao fake quantizer; torchao swaps the
layers in and, after training, back to plain Linear layers holding the latent fp32 weights, which
the deployed file quantizes (tests/test_qat.py checks the file against this rounding).
"""

from __future__ import annotations


def q4_0(weight):
    """llama.cpp's Q4_0 round trip (quantize_row_q4_0_ref, then dequantize_row_q4_0), per row in
    blocks of 32: the scale is the block's value of largest magnitude, sign kept, over -8, stored
    as fp16; codes are (int8)(x * (1/d) + 8.5) with d's fp32 inverse, at most 15; a weight comes
    back as (code - 8) * fp16(d). Ties of magnitude take the first, as llama.cpp's strict `<` does."""
    import torch

    x = weight.detach().float().reshape(-1, 32)
    extreme = x.gather(1, x.abs().argmax(dim=1, keepdim=True))
    d = extreme / -8
    inverse = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    # A float's cast to int8 truncates toward zero, as C's does; x * inverse + 8.5 is at least 0.5.
    codes = (x * inverse + 8.5).to(torch.int8).clamp(max=15)
    return ((codes.float() - 8) * d.half().float()).reshape(weight.shape).to(weight.dtype)


ROUNDINGS = {"q4_0": q4_0}


def _straight_through():
    import torch

    class StraightThrough(torch.autograd.Function):
        """The rounded weight forward, the gradient unchanged backward: the straight-through
        estimator, with a forward that is the rounding bit for bit (w + (r - w).detach() is not)."""

        @staticmethod
        def forward(ctx, weight, rounding):
            return rounding(weight)

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    return StraightThrough


def fake_quantizer(name: str):
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    rounding, function = ROUNDINGS[name], _straight_through()

    class DeployedRounding(FakeQuantizerBase):
        def __init__(self):
            super().__init__()
            self.config = name

        def forward(self, weight):
            return function.apply(weight, rounding)

    return DeployedRounding()


def targets(model) -> list[str]:
    """The Linear layers the deployed file quantizes: all but the output head, which llama.cpp
    stores in a type of its own (export.embedding_types)."""
    import torch

    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def prepare(model, name: str) -> int:
    """Swaps the target layers for torchao's fake-quantized Linear with the format's rounding; the
    same Parameters stay in place, so an optimizer made after this trains them. Returns how many."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    names = targets(model)
    for dotted in names:
        parent, _, leaf = dotted.rpartition(".")
        holder = model.get_submodule(parent)
        layer = FakeQuantizedLinear.from_linear(getattr(holder, leaf))
        layer.weight_fake_quantizer = fake_quantizer(name)
        setattr(holder, leaf, layer)
    return len(names)


def convert(model) -> None:
    """Back to plain Linear layers with the latent weights, through torchao's convert step."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"))
