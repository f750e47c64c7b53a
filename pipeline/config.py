"""Typed settings: a Hydra structured config for every config group.

Each dataclass is the schema of a group (registered as `<group>/schema`, which the group's YAML
files list first in their defaults); the YAML files hold the values and say what they mean. Where
a group's options differ in shape (data sources, model kinds, launch configs), the schema is their
union and a setting one option does not use is null.
Hydra checks every value's type as it composes the config, and refuses unknown keys. What a type
cannot say (a choice among names, a lower bound) is in each field's metadata, and `validate`
checks it before any stage's own check(), which keeps only what spans several settings or needs
the filesystem or the hardware.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from pipeline.chat import FORMATS
from pipeline.formats import METHODS, NO_QAT, QAT, SMOOTHED
from pipeline.hardware import PRECISION_TABLE, PRECISIONS

# Where prepare reads documents from (conf/data/<source>.yaml); stdlib: questions about the
# standard library answered by its docstrings (chat); docstrings: the other docstrings, the base
# model's pretraining text.
DATA_SOURCES = ("pydoc", "stdlib", "docstrings", "text", "hf")
# What to do with a chat example longer than data.seq_len (it is counted either way).
TOO_LONG = ("drop", "truncate")
# Which tokens training learns to predict: every token, or only the answers of chat data.
LOSS_ON = ("auto", "all", "assistant")
# Accelerate's distributed_type values the train stage launches with ("NO": one process).
DISTRIBUTED_TYPES = ("NO", "MULTI_GPU", "FSDP", "DEEPSPEED")

TRAINING_PRECISIONS = tuple(PRECISION_TABLE)
# 16-bit (or f32) base types of a GGUF export; "auto" picks by training precision.
BASE_TYPES = ("f16", "bf16", "f32")
# Serving engines: llama-server on GGUF files, vLLM on checkpoints, an endpoint already running; auto
# picks by hardware.
ENGINES = ("auto", "llamacpp", "vllm", "external")
# How stage outputs are checked before they are read (`verify`): each file's size and modification
# time, and its hash only where either moved ("quick"), or every file's hash ("full").
VERIFY = ("quick", "full")
# GuideLLM load profiles, and the option each one's load levels set (none: no levels).
LOAD_LEVELS = {"concurrent": "streams", "constant": "rate", "poisson": "rate", "synchronous": None, "throughput": None}


def setting(*, choices: tuple | None = None, each: tuple | None = None, low=None, high=None, factory=None,
            default=MISSING, nested: bool = False, auto: bool = False):
    """A field with the constraints beyond its type: `choices` for a name, `each` for every item
    of a list, `low` / `high` inclusive bounds, `nested` for an optional section whose own fields
    have constraints, `auto` for a number that may also be "auto" (the pipeline chooses it, before
    any work). Without a default the YAML must give the value."""
    metadata = {k: v for k, v in (("choices", choices), ("each", each), ("low", low), ("high", high),
                                  ("nested", nested or None), ("auto", auto or None)) if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ChatFields:
    """Field names of chat data: OpenAI messages by default (ShareGPT: messages=conversations,
    role=from, content=value), prompt / completion, Alpaca's instruction / input / output, and an
    optional system prompt beside them."""
    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    prompt: str = "prompt"
    completion: str = "completion"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: Optional[str] = "system"


@dataclass
class Data:
    name: str = MISSING
    source: str = setting(choices=DATA_SOURCES)
    heldout_fraction: float = MISSING
    split_seed: int = MISSING
    seq_len: int = setting(low=2)
    # source=text: files or glob patterns (one, or a list).
    files: Any = None
    # source=hf: a save_to_disk directory, a data file or directory, or a hub id.
    path: Optional[str] = None
    config_name: Optional[str] = None
    split: str = "train"
    # The column (hf) or JSON field (text .jsonl) that holds each document.
    text_field: str = "text"
    # text: documents; or chat data in one of these shapes, its field names in `fields`.
    format: str = setting(choices=FORMATS, default="text")
    fields: ChatFields = field(default_factory=ChatFields)
    # null: the tokenizer's own template (ChatML for the offline default's trained tokenizer);
    # `chatml`, or a Jinja template.
    chat_template: Optional[str] = None
    # Chat data: several examples per sequence (attention kept within each), or one per sequence, padded.
    packing: bool = True
    too_long: str = setting(choices=TOO_LONG, default="drop")


@dataclass
class Tracking:
    uri: str = MISSING
    artifact_location: Optional[str] = None
    experiment: str = MISSING
    log_model: bool = MISSING


@dataclass
class Accelerate:
    """The settings of an Accelerate launch config that the pipeline reads or sets; the file
    written for `accelerate launch` holds these (nulls left out) and `extra`, as Accelerate
    spells its keys."""
    distributed_type: str = setting(choices=DISTRIBUTED_TYPES)
    # null: one process per GPU of this machine, times num_machines.
    num_processes: Optional[int] = setting(low=1)
    compute_environment: str = "LOCAL_MACHINE"
    num_machines: int = setting(low=1, default=1)
    machine_rank: int = setting(low=0, default=0)
    main_process_ip: Optional[str] = None
    main_process_port: Optional[int] = setting(low=1, high=65535, default=None)
    rdzv_backend: str = "static"
    same_network: bool = True
    deepspeed_config: Optional[dict[str, Any]] = None
    fsdp_config: Optional[dict[str, Any]] = None
    # Any other key of Accelerate's launch config, e.g. {gpu_ids: "0,1", downcast_bf16: "no"}.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Train:
    precision: str = setting(choices=PRECISIONS)
    max_steps: int = setting(low=1)
    micro_batch_size: int = setting(low=1)
    grad_accum_steps: int = setting(low=1)
    lr: float = setting(low=0)
    weight_decay: float = setting(low=0)
    betas: list[float] = setting(factory=lambda: [0.9, 0.95])
    # Warmup as a share of max_steps, so that a shorter run keeps its shape; warmup_steps, where
    # set, counts steps instead and wins (as in Hugging Face's Trainer).
    warmup_ratio: float = setting(low=0, high=0.5, default=0.0)
    warmup_steps: Optional[int] = setting(low=0, default=None)
    min_lr_ratio: float = setting(low=0, high=1)
    max_grad_norm: float = setting(low=0)
    init_loss_scale: float = setting(low=1)
    max_consecutive_skips: int = setting(low=1)
    log_every: int = setting(low=1)
    eval_every: int = setting(low=1)
    eval_batches: Optional[int] = setting(low=1)
    checkpoint_every: int = setting(low=1)
    resume: bool = MISSING
    threads: Optional[int] = setting(low=1)
    # auto: the answers for chat data, every token for plain text.
    loss_on: str = setting(choices=LOSS_ON, default="auto")
    # The deployed format to train for with fake quantization (pipeline.qat), or none.
    qat: str = setting(choices=(NO_QAT, *QAT), default=NO_QAT)


@dataclass
class Pretrain:
    """A base model's recipe: the prepare and train stages run on these settings, from random
    initialisation, and their output is what the fine-tune starts from."""
    seed: int = MISSING
    data: Data = field(default_factory=Data)
    train: Train = field(default_factory=Train)


@dataclass
class Lora:
    enabled: bool = MISSING
    r: int = setting(low=1)
    alpha: float = setting(low=0)
    dropout: float = setting(low=0, high=1)
    target_modules: list[str] = setting(factory=list)


@dataclass
class Model:
    name: str = MISSING
    # A local checkpoint directory (or a hub id where reachable); null: build from `arch`.
    name_or_path: Optional[str] = None
    # A GGUF file to fine-tune, converted once per machine into a checkpoint in the cache
    # (pipeline/gguf_checkpoint.py): its path, or package:<distribution>/<file> for one that an
    # installed Python package ships. Stands instead of name_or_path.
    gguf: Optional[str] = None
    # A transformers config (model_type and its keys) to build a model from, or null.
    arch: Optional[dict[str, Any]] = None
    lora: Lora = field(default_factory=Lora)
    # How a base model is pretrained (from random initialisation on `arch`) before the train stage
    # fine-tunes it; null: the train stage starts from name_or_path, or from random initialisation.
    pretrain: Optional[Pretrain] = setting(nested=True, default=None)


@dataclass
class Calibration:
    samples: int = setting(low=1)
    seq_len: int = setting(low=1)


@dataclass
class AWQ:
    # llm-compressor 0.14 divides by n_grid - 2.
    n_grid: int = setting(low=3)
    duo_scaling: bool = MISSING
    smoothed_max_kl: float = setting(low=0)


@dataclass
class Quantize:
    methods: list[str] = setting(each=tuple(METHODS), factory=list)
    # A number, or "auto": the largest of GROUP_SIZES that divides every quantized layer's input width.
    group_size: Any = setting(low=1, auto=True)
    symmetric: bool = MISSING
    ignore: list[str] = setting(factory=list)
    calibration: Calibration = field(default_factory=Calibration)
    awq: AWQ = field(default_factory=AWQ)


@dataclass
class ExportCheck:
    sequences: int = setting(low=1)
    max_logit_diff: float = setting(low=0)
    max_logit_diff_rel: float = setting(low=0)
    max_kl: float = setting(low=0)
    texts: int = setting(low=1)
    conversations: int = setting(low=1, default=8)
    allow_chat_template_mismatch: bool = False


@dataclass
class Export:
    sources: list[str] = setting(each=("trained", SMOOTHED), factory=list)
    base_type: str = setting(choices=("auto", *BASE_TYPES))
    types: list[str] = setting(factory=list)
    embedding_types: dict[str, str] = setting(factory=dict)
    imatrix: list[str] = setting(factory=list)
    allow_fallback: bool = MISSING
    pre_tokenizer: str = MISSING
    check: ExportCheck = field(default_factory=ExportCheck)
    log_files_max_mb: float = setting(low=0)


@dataclass
class SecondOpinion:
    enabled: bool = MISSING
    sigmas: float = setting(low=0)
    rel: float = setting(low=0)
    kl_abs: float = setting(low=0)
    windows: Optional[int] = setting(low=1)


@dataclass
class Evaluate:
    max_sequences: Optional[int] = setting(low=1)
    batch_size: int = setting(low=1)
    bootstrap: int = setting(low=1)
    confidence: float = setting(low=0.5, high=0.999)
    prompts: int = setting(low=1)
    prompt_tokens: int = setting(low=1)
    continuation_tokens: int = setting(low=1)
    extra: dict[str, str] = setting(factory=dict)
    reference_seed: Optional[int] = None
    second_opinion: SecondOpinion = field(default_factory=SecondOpinion)
    grid_effect: Optional[str] = None


@dataclass
class LlamaCpp:
    files: Optional[list[str]] = None
    threads: int = setting(low=1)
    parallel: Optional[int] = setting(low=1)
    server: Optional[str] = None
    jinja: bool = True


@dataclass
class ServedQuality:
    sequences: int = setting(low=1)
    top_k: int = setting(low=1)
    coverage: float = setting(low=0, high=1)
    rel: float = setting(low=0)
    kl_max: float = setting(low=0)


@dataclass
class VLLM:
    command: Optional[list[str]] = None
    artifacts: list[str] = setting(each=("trained", *METHODS), factory=list)
    dtype: str = setting(choices=("auto", "float32", "bfloat16", "float16"))
    gpu_memory_utilization: float = setting(low=0.05, high=1)
    cpu_kvcache_gib: int = setting(low=1)
    extra_args: list[str] = setting(factory=list)
    quality: ServedQuality = field(default_factory=ServedQuality)


@dataclass
class External:
    url: Optional[str] = None
    model: Optional[str] = None
    api_key: Optional[str] = None


@dataclass
class Load:
    profile: str = setting(choices=tuple(LOAD_LEVELS))
    # Streams (concurrent) or requests/s (constant, poisson): ints or floats.
    levels: list[Any] = setting(factory=list)
    requests: int = setting(low=1)
    prompt_tokens: int = setting(low=1)
    output_tokens: int = setting(low=1)
    api: str = setting(choices=("auto", "completions", "chat"), default="auto")


@dataclass
class SLO:
    ttft_ms: float = setting(low=0)
    itl_ms: float = setting(low=0)


@dataclass
class Crosscheck:
    abs_ms: float = setting(low=0)
    rel: float = setting(low=0)


@dataclass
class Serve:
    engines: list[str] = setting(each=ENGINES, factory=list)
    port: Optional[int] = setting(low=1, high=65535)
    ready_timeout_s: float = setting(low=1)
    llamacpp: LlamaCpp = field(default_factory=LlamaCpp)
    vllm: VLLM = field(default_factory=VLLM)
    external: External = field(default_factory=External)
    load: Load = field(default_factory=Load)
    slo: SLO = field(default_factory=SLO)
    crosscheck: Crosscheck = field(default_factory=Crosscheck)
    # Rounds of every format, each round in a newly shuffled order; bootstrap resamples (of rounds,
    # then requests) and confidence of every served figure's interval.
    rounds: int = setting(low=1, default=2)
    bootstrap: int = setting(low=1, default=1000)
    confidence: float = setting(low=0.5, high=0.999, default=0.95)


@dataclass
class Report:
    precisions: list[str] = setting(each=TRAINING_PRECISIONS, factory=list)
    runs: list[str] = setting(factory=list)
    noise_seed: int = MISSING
    qat: str = setting(choices=tuple(QAT), default="q4_0")
    serve_level: str = MISSING
    quality_metric: str = setting(choices=("kl", "perplexity"))
    min_sequences: int = setting(low=2)
    max_interval_width: float = setting(low=0)
    kl_budgets: list[float] = setting(factory=list)
    gates: list[Any] = setting(factory=list)
    deploy_kl: float = setting(low=0)
    # null: on where tracking.uri is a server (report.register resolves it).
    register: Optional[bool] = None
    registered_model: str = MISSING


SCHEMAS = {"model": Model, "data": Data, "tracking": Tracking, "accelerate": Accelerate, "train": Train,
           "quantize": Quantize, "export": Export, "evaluate": Evaluate, "serve": Serve, "report": Report}


def register() -> None:
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group=group, name="schema", node=schema)


def problems(value, schema, path: str) -> list[str]:
    """What in `value` (a group's settings) breaks the constraints of `schema`'s fields."""
    found = []
    for f in dataclasses.fields(schema):
        item, where, rule = value.get(f.name), f"{path}.{f.name}", f.metadata
        if dataclasses.is_dataclass(f.default_factory):
            found += problems(item or {}, f.default_factory, where)
        if rule.get("nested") and item is not None:
            found += problems(item, typing.get_args(typing.get_type_hints(schema)[f.name])[0], where)
            continue
        if item is None or not rule:
            continue
        if rule.get("auto"):
            if item == "auto":
                continue
            if not isinstance(item, int) or isinstance(item, bool):
                found.append(f"{where}={item!r} must be auto or a whole number.")
                continue
        if "choices" in rule and item not in rule["choices"]:
            found.append(f"{where}={item!r} is not one of {', '.join(rule['choices'])}.")
        if "each" in rule and (not item or any(i not in rule["each"] for i in item)):
            found.append(f"{where}={list(item)} must be a non-empty list of {', '.join(rule['each'])}.")
        if "low" in rule and item < rule["low"]:
            found.append(f"{where}={item} must be at least {rule['low']}.")
        if "high" in rule and item > rule["high"]:
            found.append(f"{where}={item} must be at most {rule['high']}.")
    return found


def validate(cfg: DictConfig) -> None:
    """Every constraint of every group's schema, all reported at once."""
    found = [p for group, schema in SCHEMAS.items() if group in cfg for p in problems(cfg[group], schema, group)]
    if cfg.get("verify") not in VERIFY:
        found.append(f"verify={cfg.get('verify')!r} is not one of {', '.join(VERIFY)}.")
    if not isinstance(cfg.get("verbose"), bool):
        found.append(f"verbose={cfg.get('verbose')!r} is not one of true, false.")
    if found:
        raise ValueError(" ".join(found))
