"""Quantization-aware training: every Linear the deployed format quantizes computes with its weight
rounded as that format will round it, so that training adapts to the file's error.

The rounding must be the deployed format's exactly: llama.cpp's Q4_0, or the compressed-tensors
W4A16 that the quantize stage's RTN writes for vLLM. Users who trained with torchao's own int4 fake
quantizer (a scale of amax / 7.5 kept in fp32, round half to even) and deployed a llama.cpp Q4_0
file saw no gain (torchtune#2845, pytorch/ao#2419): Q4_0 rounds otherwise. So the rounding here is
our own, plugged into torchao's fake-quantized Linear as a torchao fake quantizer; torchao swaps the
layers in and, after training, back to plain Linear layers holding the latent fp32 weights, which
the deployed file quantizes (tests/test_qat.py checks the file against this rounding).
"""

from __future__ import annotations

from pipeline.formats import ignored


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


def w4a16(weight, group_size: int, symmetric: bool):
    """The W4A16 round trip of llm-compressor's RTN (its memoryless min-max observer, then
    compressed-tensors' calculate_qparams and quantize, then dequantize), per row in groups of
    `group_size` input channels, with the same operations in the same order so that every bit
    agrees: the range widened to hold zero, scale (max - min) / 15 and an integer zero point, or
    max |x| / 7.5 and none when symmetric; codes round(clamp(x / scale + zero, -8, 7)), half to
    even; a weight comes back as (code - zero) * scale, in fp32."""
    import torch

    x = weight.detach().float().reshape(weight.shape[0], -1, group_size)
    low = torch.min(x.amin(dim=-1, keepdim=True), torch.zeros(()))
    high = torch.max(x.amax(dim=-1, keepdim=True), torch.zeros(()))
    if symmetric:
        scale = torch.max(low.abs(), high.abs()) / 7.5
        zero = torch.zeros_like(scale)
    else:
        scale = (high - low) / 15
        zero = torch.clamp(-8 - low / scale, -8, 7)
    # An all-zero group: the scale becomes fp32's epsilon (its zero point is computed before that).
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(torch.float32).eps), scale)
    zero = torch.round(torch.clamp(zero, -128, 127)).to(torch.int8).float()
    codes = torch.round(torch.clamp(x / scale + zero, -8, 7))
    return ((codes - zero) * scale).reshape(weight.shape).to(weight.dtype)


def rounding(cfg):
    """train.qat's round trip, with the settings of the stage that writes its format, and the
    block of input channels it rounds together (which must divide every target's width)."""
    import functools

    if cfg.train.qat == "q4_0":
        return q4_0, 32
    from pipeline.grouping import group_size

    size = group_size(cfg)
    return functools.partial(w4a16, group_size=size, symmetric=cfg.quantize.symmetric), size


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


def fake_quantizer(name: str, round_trip):
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    function = _straight_through()

    class DeployedRounding(FakeQuantizerBase):
        def __init__(self):
            super().__init__()
            self.config = name

        def forward(self, weight):
            return function.apply(weight, round_trip)

    return DeployedRounding()


def targets(model, cfg) -> list[str]:
    """The Linear layers the deployed format quantizes. A Q4_0 file: all but the output head, which
    llama.cpp stores in a type of its own (export.embedding_types). A W4A16 checkpoint: all that
    quantize.ignore leaves."""
    import torch

    head = model.get_output_embeddings()
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if cfg.train.qat == "q4_0":
        return [n for n, m in linear if m is not head]
    return [n for n, _ in linear if not ignored(n, cfg.quantize.ignore)]


def prepare(model, cfg) -> int:
    """Swaps the target layers for torchao's fake-quantized Linear with the format's rounding; the
    same Parameters stay in place, so an optimizer made after this trains them. Returns how many."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    round_trip, _ = rounding(cfg)
    names = targets(model, cfg)
    for dotted in names:
        parent, _, leaf = dotted.rpartition(".")
        holder = model.get_submodule(parent)
        layer = FakeQuantizedLinear.from_linear(getattr(holder, leaf))
        layer.weight_fake_quantizer = fake_quantizer(cfg.train.qat, round_trip)
        setattr(holder, leaf, layer)
    return len(names)


def convert(model) -> None:
    """Back to plain Linear layers with the latent weights, through torchao's convert step."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"))
