"""quantize.group_size: the number the W4A16 formats round in groups of, chosen for the model
where it is `auto`. The quantize stage and QAT for W4A16 (pipeline.qat) both read it here."""

from __future__ import annotations

from pipeline.formats import ignored

# quantize.group_size=auto takes the largest of these that divides every quantized layer's input
# width: 128 is llm-compressor's W4A16 preset; smaller groups cost more scales for a closer fit.
GROUP_SIZES = (128, 64, 32)
_CHOSEN: dict[str, tuple[int | None, list[int]]] = {}


def group_size(cfg) -> int:
    """quantize.group_size as a number. `auto` stays "auto" in the settings, and so in the outputs'
    addresses, which also hold the model and quantize.ignore that decide it: a config read without
    the pre-flight checks (a sweep's variant, a test) finds the same outputs. Refused in one line
    where no size fits."""
    q = cfg.quantize
    if q.group_size != "auto":
        return int(q.group_size)
    chosen, widths = auto_group_size(cfg)
    if chosen is None:
        raise ValueError(f"quantize.group_size=auto: none of {', '.join(map(str, GROUP_SIZES))} divides every quantized "
                         f"Linear layer's input width ({widths}); set quantize.group_size to a divisor of them all, or "
                         "add the layers to quantize.ignore.")
    return chosen


def auto_group_size(cfg) -> tuple[int | None, list[int]]:
    """The largest of GROUP_SIZES that divides every quantized Linear layer's input width (None: none
    does), and those widths; read from the model's shapes once per model and ignore list."""
    import json

    from omegaconf import OmegaConf

    key = json.dumps([OmegaConf.to_container(cfg.model, resolve=True), list(cfg.quantize.ignore)], sort_keys=True)
    if key not in _CHOSEN:
        widths = sorted(set(quantized_linears(cfg).values()))
        _CHOSEN[key] = (next((g for g in GROUP_SIZES if all(w % g == 0 for w in widths)), None), widths)
    return _CHOSEN[key]


def quantized_linears(cfg, model=None) -> dict[str, int]:
    """{name: input width} of the Linear layers the quantize stage quantizes (all but quantize.ignore),
    read from the model's shapes without its weights."""
    import torch

    from pipeline.models import shape_only_model

    model = model if model is not None else shape_only_model(cfg)
    return {n: m.in_features for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not ignored(n, cfg.quantize.ignore)}
