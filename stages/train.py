"""train: causal-LM fine-tune through Accelerate at fp32, bf16, fp16 (dynamic loss scaling) or fp8.

Weights and optimizer states stay fp32 in every mode; the precision only changes the compute
(autocast). The output directory holds the final model in Hugging Face format (config,
safetensors, tokenizer) and summary.json: the input of every later stage. With LoRA the model is
the merged one, and adapter/ holds the adapter as PEFT saved it before the merge (where its base
is a checkpoint that can be loaded again).

With `accelerate=ddp|fsdp|deepspeed_*` the same function runs in every launched process
(pipeline.distributed): each takes its share of the global batch, and only the main process
logs and writes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import atomic_dir, read_json, require_stage_output, scratch_dir, stage_dir, write_json
from pipeline.chat import is_chat
from pipeline.data import load_sequences, pad_id
from pipeline.distributed import SHARDED
from pipeline.hardware import PRECISION_TABLE, PrecisionError, peak_memory_mb
from pipeline.gguf_checkpoint import PROVENANCE
from pipeline.models import model_config, pretrained_source, safe_weights, shape_only_model, starting_checkpoint
from pipeline.tokenizer import save_tokenizer
from pipeline.contract import Stage, declared
from pipeline.formats import NO_QAT, QAT, qat_settings
from pipeline import console, qat

STAGE = Stage("train", settings=("model", "train", "seed", "accelerate.num_processes"), reads=("prepare",),
              ignores=("train.resume", "train.log_every", "train.checkpoint_every"), launchable=True,
              # QAT for W4A16 rounds in quantize.group_size groups: those settings are a QAT run's too.
              more_settings=qat_settings,
              # The LoRA adapter's folder inside the output.
              names={"adapter": "adapter"})

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> list[str]:
    t = cfg.train
    if t.warmup_steps is not None and t.warmup_steps >= t.max_steps:
        raise ValueError(f"train.warmup_steps={t.warmup_steps} must be below train.max_steps={t.max_steps}, or null "
                         f"to warm up for train.warmup_ratio={t.warmup_ratio} of the steps.")
    arch = cfg.model.arch
    if arch is not None and cfg.data.seq_len > arch.max_position_embeddings:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds model.arch.max_position_embeddings="
                         f"{arch.max_position_embeddings}.")
    if t.loss_on == "assistant" and not is_chat(cfg.data):
        raise ValueError(f"train.loss_on=assistant needs chat data; data.format={cfg.data.format} is plain text, which "
                         "has no answers. Use train.loss_on=all (or auto), or a chat data.format.")
    source = pretrained_source(cfg)
    verified = [safe_weights(source) if source is not None else "no user checkpoint: the pipeline's own base model or random weights"]
    if cfg.model.lora.enabled:
        lora_targets(cfg)
        verified.append(f"model.lora.target_modules={list(cfg.model.lora.target_modules)} match Linear layers")
    if t.qat != NO_QAT:
        verified.append(qat_targets(cfg))
    return verified


def qat_targets(cfg: DictConfig) -> str:
    """QAT trains the whole model's weights for their deployed rounding: a LoRA adapter would be
    merged into them after training, unrounded. The format's blocks must fill every row."""
    if cfg.model.lora.enabled:
        raise ValueError(f"train.qat={cfg.train.qat} needs a full fine-tune: set model.lora.enabled=false, or "
                         f"train.qat={NO_QAT}.")
    model = shape_only_model(cfg)
    _, block = qat.rounding(cfg)
    widths = {n: model.get_submodule(n).in_features for n in qat.targets(model, cfg)}
    bad = {n: w for n, w in widths.items() if w % block}
    if bad:
        name, width = next(iter(bad.items()))
        raise ValueError(f"train.qat={cfg.train.qat}: {len(bad)} Linear layer(s) have rows that do not fill "
                         f"{QAT[cfg.train.qat].label}'s blocks of {block} (e.g. {name}, input width {width}); the "
                         f"deployed format would not round them as training did. Use train.qat={NO_QAT}.")
    return f"train.qat={cfg.train.qat}: {len(widths)} Linear layers fake-quantized, every row in blocks of {block}"


def loss_on_all(cfg: DictConfig) -> bool:
    return cfg.train.loss_on == "all" or (cfg.train.loss_on == "auto" and not is_chat(cfg.data))


def lora_targets(cfg: DictConfig) -> None:
    """Every name in model.lora.target_modules must name Linear layers of this model: peft adapts
    whichever match and silently skips the rest (Phi-3 fuses q/k/v into qkv_proj)."""
    import torch

    model = shape_only_model(cfg)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in cfg.model.lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        layers = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"model.lora.target_modules: {', '.join(missing)} match no Linear layer of {type(model).__name__}; "
                         f"its Linear layers: {', '.join(layers)}.")


def build_model(cfg: DictConfig, tokenizer):
    """fp32 model: from the pretrained base or the checkpoint in model.name_or_path, or freshly
    initialised from model.arch."""
    import torch
    from transformers import AutoModelForCausalLM

    source = starting_checkpoint(cfg)
    if source is not None:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if len(tokenizer) > cfg.model.arch.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens, more than model.arch.vocab_size={cfg.model.arch.vocab_size}.")
    config = model_config(cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def add_lora(model, lora: DictConfig):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def make_accelerator(precision: str, grad_accum_steps: int, init_loss_scale: float):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradScalerKwargs

    # Without CUDA, Accelerate joins launched processes into one (gloo) group only when told to
    # run on the CPU; otherwise each process would train a model of its own.
    launched_on_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=launched_on_cpu,
        mixed_precision=PRECISION_TABLE[precision].mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        kwargs_handlers=[GradScalerKwargs(init_scale=init_loss_scale)],
        # The schedule is defined in optimizer steps; stepping it once per step ourselves keeps
        # it that way under several processes too.
        step_scheduler_with_optimizer=False,
    )
    if precision == "fp16" and accelerator.scaler is None:
        # Accelerate turns fp16 off on a CPU without a word and trains in fp32. torch runs fp16
        # autocast and a GradScaler on the CPU, so switch both on before prepare() wraps the
        # model and optimizer; the compute-dtype check after the first step proves it worked.
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=init_loss_scale)
    return accelerator


def fp8_layers(model) -> int:
    """The Linear layers Accelerate turned into torchao's Float8Linear, whose matmuls run in fp8: it
    leaves the first and the last, and any whose dimensions fp8 kernels cannot take. With none, an
    fp8 run would be a bf16 run under another name."""
    from torchao.float8 import Float8Linear

    converted = sum(isinstance(m, Float8Linear) for m in model.modules())
    if not converted:
        raise PrecisionError("train.precision=fp8 converted no Linear layer to fp8 (Accelerate leaves the first and "
                             "last, and torchao those whose dimensions are not multiples of 16): this model would "
                             "train in bf16. Use train.precision=bf16, or a model with more or wider layers.")
    return converted


class ComputeDtypeProbe:
    """Records the output dtype of the model's first Linear layer, i.e. what the matmuls ran in."""

    def __init__(self, model):
        import torch

        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        self.dtype = None
        self._handle = linear.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        self.dtype = str(output.dtype).removeprefix("torch.")
        self._handle.remove()


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int):
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_at(blocks, index: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """Process `rank`'s share of the `index`-th global batch (batch_size x world rows) of a
    shuffle that is redrawn every epoch. A pure function of its arguments, so a resumed run
    continues with exactly the batches it would have seen, and N processes together see the
    batches of one process with an N times larger micro-batch."""
    import torch

    n = len(blocks)
    first = (index * world + rank) * batch_size
    positions = range(first, first + batch_size)
    return blocks[torch.stack([_epoch_order(n, seed, p // n)[p % n] for p in positions])]


def warmup_steps(t: DictConfig) -> int:
    """train.warmup_steps where set, else the train.warmup_ratio share of max_steps (rounded up,
    as Hugging Face's Trainer does; a ratio of at most a half leaves steps to decay over)."""
    return t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * t.max_steps)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def heldout_loss(model, blocks, batch_size: int, accelerator, loss_all: bool) -> float:
    """Mean loss over `blocks`, each process evaluating an equal share (the same number of
    forward passes everywhere, as sharded models need)."""
    import torch

    model.eval()
    share = blocks[accelerator.process_index :: accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss sum, rows
    with torch.no_grad():
        for i in range(0, len(share), batch_size):
            batch = share[i : i + batch_size].to(accelerator.device)
            total += torch.tensor([model(**batch.model_inputs(loss_all)).loss.item() * len(batch), len(batch)],
                                  dtype=torch.float64, device=accelerator.device)
    model.train()
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def save_checkpoint(accelerator, path: Path, state: dict) -> None:
    """Every process adds its part (its RNG state; its shard under FSDP or DeepSpeed) to the
    main process's atomic_dir, which it completes and renames into place."""
    main = accelerator.is_main_process
    # Not a stage output: resuming reads it at once, and hashing model and optimizer states at
    # every checkpoint would cost more than writing them.
    with atomic_dir(path, record=False) if main else contextlib.nullcontext(scratch_dir(path)) as scratch:
        accelerator.wait_for_everyone()  # the main process has made the directory
        accelerator.save_state(str(scratch))
        accelerator.wait_for_everyone()  # and every part is in it
        if main:
            write_json(scratch / "trainer_state.json", state)
    if main:
        for old in sorted(path.parent.glob("step-*"))[:-1]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def check_replicas_agree(accelerator, model) -> list[str]:
    """Under data parallelism every process holds the whole model, and the copies must be equal
    bit for bit after training; a difference means the processes did not train one model."""
    import hashlib

    import torch
    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for tensor in accelerator.unwrap_model(model).state_dict().values():
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) != 1:
        raise RuntimeError(f"The processes' model copies differ after training (sha256 per rank: {digests}).")
    return digests


@dataclass
class Progress:
    """Where the loop stands; what a checkpoint keeps besides the model and optimizer."""

    step: int = 0
    skipped: int = 0
    resumed_from: int = 0
    # [step, value] pairs of the curves the report draws.
    history: dict = field(default_factory=lambda: {"train_loss": [], "eval_loss": [], "step_time_s": []})
    consecutive_skips: int = 0
    compute_dtype: str | None = None
    # Under torchao's fp8: the Linear layers whose matmuls run in fp8 (else None).
    fp8_layers: int | None = None
    # Per optimizer step since the last logged window.
    window: dict = field(default_factory=lambda: {"loss": [], "time": [], "grad_norm": [], "tokens": []})
    # Of every step: what tokens/s is measured over.
    seconds: float = 0.0
    tokens: int = 0

    def state(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped, "history": self.history}


@dataclass
class Step:
    loss: float  # of the global batch
    grad_norm: float | None  # None under DeepSpeed, which clips inside its engine
    seconds: float
    skipped: bool  # fp16's loss scaler found an overflow and skipped the update
    tokens: int  # real (not padding) tokens of the global batch


def restore(accelerator, checkpoints: Path, resume: bool) -> Progress:
    """The last checkpoint's progress with train.resume, else a fresh start (and no stale checkpoints)."""
    last = latest_checkpoint(checkpoints)
    if resume and last is not None:
        accelerator.load_state(str(last))
        state = read_json(last / "trainer_state.json")
        log.info("resuming from %s (step %d)", last, state["step"])
        return Progress(step=state["step"], skipped=state["skipped_steps"], history=state["history"],
                        resumed_from=state["step"])
    if resume:
        log.warning("train.resume=true but no checkpoint under %s: starting from step 0", checkpoints)
    elif checkpoints.exists() and accelerator.is_main_process:
        shutil.rmtree(checkpoints)  # a fresh run must not be resumed from a stale one later
    accelerator.wait_for_everyone()
    return Progress()


def optimizer_step(model, optimizer, trainable, accelerator, blocks, step: int, cfg: DictConfig) -> Step:
    """One optimizer step over train.grad_accum_steps micro-batches of this process's share."""
    import torch

    t, started, loss_all = cfg.train, time.perf_counter(), loss_on_all(cfg)
    loss_sum, grad_norm = 0.0, None
    real_tokens = torch.zeros((), dtype=torch.int64, device=accelerator.device)
    for micro in range(t.grad_accum_steps):
        batch = batch_at(blocks, step * t.grad_accum_steps + micro, t.micro_batch_size, cfg.seed,
                         accelerator.process_index, accelerator.num_processes).to(accelerator.device)
        real_tokens += batch.real.sum()
        with accelerator.accumulate(model):
            loss = model(**batch.model_inputs(loss_all)).loss
            if not torch.isfinite(loss) and accelerator.scaler is None:
                raise FloatingPointError(
                    f"Loss became {loss.item()} at step {step} (train.precision={t.precision}). "
                    f"Lower train.lr (now {t.lr}) or check the data and checkpoint.")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
                grad_norm = None if norm is None else float(norm)
            optimizer.step()
            optimizer.zero_grad()
        # The loss of the global batch: every process's share weighs the same.
        loss_sum += accelerator.reduce(loss.detach(), "mean").item()
    # Real tokens of the global batch, summed once a step: padding differs between processes.
    return Step(loss_sum / t.grad_accum_steps, grad_norm, time.perf_counter() - started, optimizer.step_was_skipped,
                int(accelerator.reduce(real_tokens, "sum")))


def account(progress: Progress, step: Step, probe, accelerator, cfg: DictConfig, tracker) -> None:
    """Checks the first step's compute dtype, counts fp16's skipped steps, and adds the step to the window."""
    t = cfg.train
    if progress.compute_dtype is None:
        progress.compute_dtype = probe.dtype
        expected = PRECISION_TABLE[t.precision].compute_dtype
        if progress.compute_dtype != expected:
            raise RuntimeError(f"train.precision={t.precision} asked for {expected} "
                               f"compute but the model computed in {progress.compute_dtype}; refusing to go on.")
        tracker.set_tags({"train.compute_dtype": progress.compute_dtype})
    if step.skipped:
        progress.skipped += 1
        progress.consecutive_skips += 1
        if progress.consecutive_skips > t.max_consecutive_skips:
            raise FloatingPointError(
                f"{progress.consecutive_skips} fp16 steps in a row overflowed (loss scale now "
                f"{accelerator.scaler.get_scale()}); fp16 cannot represent this run's values. "
                f"Use train.precision=bf16 or fp32, or lower train.lr.")
    else:
        progress.consecutive_skips = 0
        progress.window["loss"].append(step.loss)
        if step.grad_norm is not None:
            progress.window["grad_norm"].append(step.grad_norm)
    progress.window["time"].append(step.seconds)
    progress.window["tokens"].append(step.tokens)
    progress.seconds += step.seconds
    progress.tokens += step.tokens
    progress.step += 1


def log_window(progress: Progress, scheduler, accelerator, tracker) -> dict:
    """Means of the steps since the last window, logged at the step reached; the window restarts.
    Tokens/s counts real tokens only, not padding."""
    window, step_time = progress.window, sum(progress.window["time"]) / len(progress.window["time"])
    metrics = {"train/step_time_s": step_time, "train/tokens_per_s": sum(window["tokens"]) / sum(window["time"]),
               "train/lr": scheduler.get_last_lr()[0], "train/peak_memory_mb": peak_memory_mb(accelerator.device.type),
               "train/skipped_steps": progress.skipped}
    if window["loss"]:
        metrics["train/loss"] = sum(window["loss"]) / len(window["loss"])
        progress.history["train_loss"].append([progress.step, metrics["train/loss"]])
    if window["grad_norm"]:
        metrics["train/grad_norm"] = sum(window["grad_norm"]) / len(window["grad_norm"])
    if accelerator.scaler is not None:
        metrics["train/loss_scale"] = accelerator.scaler.get_scale()
    tracker.log_metrics(metrics, step=progress.step)
    progress.history["step_time_s"].append([progress.step, step_time])
    progress.window = {k: [] for k in window}
    return metrics


def finish(cfg: DictConfig, model, accelerator, tokenizer, progress: Progress, eval_blocks, started: float,
           checkpoints: Path) -> None:
    """The final held-out loss and the output: the model (LoRA merged) and summary.json, written
    by the main process once every process has taken part in gathering the weights."""
    t, out, world = cfg.train, stage_dir(cfg, "train"), accelerator.num_processes
    # The loop measured it at its last step (a second pass over the held-out batches costs a real
    # model as much as several training steps); a run resumed at its end had no such step.
    last = progress.history["eval_loss"][-1] if progress.history["eval_loss"] else None
    final_loss = (last[1] if last and last[0] == t.max_steps else
                  heldout_loss(model, eval_blocks, t.micro_batch_size, accelerator, loss_on_all(cfg)))
    distributed = accelerator.distributed_type.value
    sharded = distributed in SHARDED  # FSDP and DeepSpeed shard the weights
    state_dict = accelerator.get_state_dict(model) if sharded else None
    replicas = check_replicas_agree(accelerator, model) if world > 1 and not sharded else []
    times = [v for _, v in progress.history["step_time_s"]]
    step_time = sum(times) / max(1, len(times))
    summary = {
        "precision": t.precision, "compute_dtype": progress.compute_dtype, "master_dtype": "float32",
        "steps": t.max_steps, "resumed_from_step": progress.resumed_from, "skipped_steps": progress.skipped,
        "heldout_loss": final_loss, "heldout_perplexity": math.exp(final_loss),
        "start_heldout_loss": next((v for step, v in progress.history["eval_loss"] if step == 0), None),
        "train_seconds": time.perf_counter() - started, "peak_memory_mb": peak_memory_mb(accelerator.device.type),
        "step_time_s": step_time, "tokens": progress.tokens,
        "tokens_per_s": progress.tokens / progress.seconds if progress.seconds else None,
        "loss_on": "all" if loss_on_all(cfg) else "assistant",
        # With QAT, the held-out losses are those of the fake-quantized model, as deployed.
        "qat": t.qat, "fp8_linear_layers": progress.fp8_layers,
        "history": progress.history, "device": accelerator.device.type, "num_processes": world,
        "distributed_type": distributed, "replica_sha256": replicas,
    }
    # What the report and MLflow flag about this fine-tune, in words (None: nothing).
    summary["check"] = got_worse(summary)
    summary["weights_origin"] = weights_origin(starting_checkpoint(cfg))
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with atomic_dir(out) as tmp:
            if cfg.model.lora.enabled:
                # The adapter too, before merging it, where its base can be loaded again: evaluate
                # measures what the merge costs (the unmerged model against the merged one).
                if starting_checkpoint(cfg) is not None:
                    unwrapped.save_pretrained(tmp / STAGE.names["adapter"], safe_serialization=True)
                unwrapped = unwrapped.merge_and_unload()
            if t.qat != NO_QAT:  # the latent fp32 weights, which the deployed file rounds as training did
                qat.convert(unwrapped)
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            save_tokenizer(tokenizer, tmp)
            write_json(tmp / "summary.json", summary)
        shutil.rmtree(checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()


def run(cfg: DictConfig, tracker) -> None:
    import torch
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    prepared = require_stage_output(cfg, "prepare")
    tracker.set_tags({"data_hash": read_json(prepared / declared("prepare").names["manifest"])["data_hash"]})
    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    train_blocks, heldout_blocks = (load_sequences(prepared, split, cfg.data.seq_len, cfg.data.packing, pad_id(tokenizer))
                                    for split in ("train", "heldout"))

    set_seed(cfg.seed)
    model = build_model(cfg, tokenizer)
    if cfg.model.lora.enabled:
        model = add_lora(model, cfg.model.lora)
    if t.qat != NO_QAT:
        tracker.set_tags({"train.qat_layers": qat.prepare(model, cfg)})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, betas=tuple(t.betas),
                                  weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, warmup=warmup_steps(t), total=t.max_steps, min_ratio=t.min_lr_ratio)
    )

    accelerator = make_accelerator(t.precision, t.grad_accum_steps, t.init_loss_scale)
    if accelerator.device.type == "cuda":  # a multirun's earlier precision must not be this one's peak
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    main = accelerator.is_main_process
    try:
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)
        # FSDP replaces the parameters with shards, so collect them again from the prepared model.
        trainable = [p for p in model.parameters() if p.requires_grad]
        masters = {str(p.dtype) for p in trainable}
        # DeepSpeed keeps the fp32 masters inside its optimizer and casts the module's own copy.
        if masters != {"torch.float32"} and accelerator.distributed_type.value != "DEEPSPEED":
            raise RuntimeError(f"Master weights must be fp32, found {masters}.")
        probe = ComputeDtypeProbe(model)
        # fp8 through torchao (Accelerate's first choice): how many layers it reaches.
        converted = fp8_layers(model) if accelerator.fp8_backend.value == "AO" else None
        if converted is not None:
            tracker.set_tags({"train.fp8_layers": converted})
        world = accelerator.num_processes
        # eval_batches counts global batches; a whole held-out split loses up to world - 1 rows
        # so that every process gets an equal share.
        eval_rows = len(heldout_blocks) if t.eval_batches is None else t.eval_batches * t.micro_batch_size * world
        eval_blocks = heldout_blocks[: eval_rows - eval_rows % world]
        checkpoints = Path(cfg.paths.artifacts).resolve() / "checkpoints" / stage_dir(cfg, "train").name

        progress, started = restore(accelerator, checkpoints, t.resume), time.perf_counter()
        progress.fp8_layers = converted
        if progress.step == 0:  # where the model starts: what the fine-tune gains is measured from here
            loss = heldout_loss(model, eval_blocks, t.micro_batch_size, accelerator, loss_on_all(cfg))
            tracker.log_metrics({"eval/loss": loss, "eval/perplexity": math.exp(loss)}, step=0)
            progress.history["eval_loss"].append([0, loss])
        bar = console.bar(t.max_steps, progress.step, f"train {t.precision}", shown_here=main)
        while progress.step < t.max_steps:
            step = optimizer_step(model, optimizer, trainable, accelerator, train_blocks, progress.step, cfg)
            scheduler.step()
            account(progress, step, probe, accelerator, cfg, tracker)
            bar.update()
            done = progress.step
            if done % t.log_every == 0 or done == t.max_steps:
                metrics = log_window(progress, scheduler, accelerator, tracker)
                bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.3f}")
            if done % t.eval_every == 0 or done == t.max_steps:
                loss = heldout_loss(model, eval_blocks, t.micro_batch_size, accelerator, loss_on_all(cfg))
                tracker.log_metrics({"eval/loss": loss, "eval/perplexity": math.exp(loss)}, step=done)
                progress.history["eval_loss"].append([done, loss])
            if done % t.checkpoint_every == 0 and done < t.max_steps:
                save_checkpoint(accelerator, checkpoints / f"step-{done:06d}", progress.state())
                tracker.flush()
        bar.close()
        finish(cfg, model, accelerator, tokenizer, progress, eval_blocks, started, checkpoints)
    finally:
        # Accelerate keeps its state in a process-wide singleton; a Hydra multirun trains the
        # next precision in this same process and must start from a clean one.
        AcceleratorState._reset_state(reset_partial_state=True)
    if main:  # other machines of a multi-machine run may not see the output's files
        record(cfg, tracker)


def weights_origin(source: str | None) -> str | None:
    """Where the starting weights came from, in words, where the checkpoint was converted from a
    GGUF file (model.gguf): its grid is the file's, which fine-tuning moves the weights off."""
    provenance = Path(source) / PROVENANCE if source else None
    if provenance is None or not provenance.is_file():
        return None
    p = read_json(provenance)
    package = f" (package {p['package']})" if p.get("package") else ""
    return (f"{p.get('general_name') or p['gguf']} from {p['gguf']}{package}, dequantized to fp32 from the file's "
            f"{'/'.join(p['tensor_types'])} tensors: the fine-tune starts on that grid")


def got_worse(summary: dict) -> str | None:
    """Why the fine-tune is suspect where it left the held-out loss above where the model started
    (too high an lr, too many steps for the data), else None."""
    start, end = summary.get("start_heldout_loss"), summary.get("heldout_loss")
    if start is None or end is None or end <= start:
        return None
    return (f"the {summary['precision']} fine-tune left the held-out loss worse than before training ({start:.4g} -> "
            f"{end:.4g}): the model over-fitted or diverged; lower train.lr or train.max_steps.")


def record(cfg: DictConfig, tracker) -> None:
    out = stage_dir(cfg, "train")
    summary = read_json(out / "summary.json")
    tracker.set_tags({"train.output": str(out), "train.compute_dtype": summary["compute_dtype"]})
    start = {"final/start_heldout_loss": summary["start_heldout_loss"]} if summary.get("start_heldout_loss") else {}
    tracker.log_metrics({**start, "final/heldout_loss": summary["heldout_loss"],
                         "final/heldout_perplexity": summary["heldout_perplexity"],
                         "final/skipped_steps": summary["skipped_steps"]}, step=summary["steps"])
    tracker.log_artifact(out / "summary.json")
    if summary.get("weights_origin"):
        tracker.set_tags({"model.weights_origin": summary["weights_origin"]})
    if summary.get("check"):
        tracker.set_tags({"train.check": summary["check"]})
        log.warning(summary["check"])
    if cfg.tracking.log_model:
        tracker.log_artifacts(out, "model")
