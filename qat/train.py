"""THE entry point: quantization-aware training from a recipe.

    accelerate launch qat/train.py recipe=NAME [a.b=value ...]      (any accelerate/DeepSpeed config)
    python qat/train.py recipe=NAME [a.b=value ...]                  (one process)

Flow: load the base model → PTQ initialisation (fake-quant linears holding the RTN, GPTQ, AWQ or mixed-precision
solution of `quant.init` / `quant.bits`, qat/ptq/) → train with straight-through gradients (optionally distilling
from the float weights) → convert → `<out_dir>/final/` (packed artifact, loadable with `qat.models.load`).
`train.steps=0` skips training: the same recipe yields the PTQ baseline, and `quant.bits=16` the float one.

Outputs under `out_dir`: `recipe.yaml` (resolved), `ptq.json` (per-layer PTQ errors and bits, when calibrated),
`logs/` (TensorBoard), `checkpoints/step_N/`
(accelerate state: model, optimizer, RNG and step; written to a temporary name and renamed, so a
crash never leaves a half checkpoint), `final/`. `train.resume=auto` continues from the newest checkpoint
and reaches the same weights, bit for bit, as an uninterrupted run: the data order comes from a seeded
sampler and an explicit DataLoader generator, and accelerate restores every RNG.

Device policy: on CPU, accelerate runs gloo DDP (`cpu=True`), or DeepSpeed over gloo when launched with a
DeepSpeed config; on GPUs the defaults. Mixed precision `auto` means bf16 on GPU, float32 on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `qat` importable and keep qat/*.py from shadowing modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qat import blockap, data, lora, objectives, sharding, teacher_cache
from qat.config import Recipe, RecipeError, exit_on_error, flatten, load_recipe, save_recipe
from qat.export import save_artifact, size_report
from qat.models import DTYPES, adapter, check_path, family_of
from qat.modules import QuantizedLinear
from qat.ptq.calibrate import calibration_ids
from qat.ptq.pipeline import quantize_model
from qat.swap import convert, fake_quant_modules, prepare, quant_stats, rederive_scales, set_fake_quant


@dataclass
class ValidationResult:
    """Validation losses of a run: the float base as loaded, the PTQ model at step 0 (quantized runs), and the
    trained model at each evaluation (`curve`: [step, loss]; `final` = the last)."""

    data: str
    metric: str
    windows: int
    base: float | None = None
    ptq: float | None = None
    final: float | None = None
    curve: list | None = None
    merged: float | None = None  # LoRA-QAT: the artifact, after merging the adapters and re-quantizing


class Validation:
    """The trainer's validation: `eval.heldout`'s metric (qat.objectives.heldout_loss) on `train.eval_rows` windows
    evenly spaced over the validation data (data.eval_source, data.spread), with fake quant on when quantizing."""

    def __init__(self, ids: torch.Tensor, family: str, quantized: bool, batch_size: int, data_name: str) -> None:
        self.ids, self.family, self.quantized, self.batch_size = ids, family, quantized, batch_size
        metric = "NLL per token" if family == "qwen3" else (
            "masked-token NLL, mean over mask ratios " + "/".join(f"{r:g}" for r in objectives.HELDOUT_RATIOS))
        self.result = ValidationResult(data=data_name, metric=metric, windows=len(ids), curve=[])

    @classmethod
    def build(cls, recipe: Recipe, tokenizer) -> Validation:
        src = data.eval_source(recipe.data)
        ids = data.windows(src, tokenizer, recipe.train.seq_len, recipe.train.eval_rows)
        return cls(ids, recipe.model.family, recipe.quant.enabled, recipe.train.batch_size, data.describe(src))

    def __call__(self, model: torch.nn.Module) -> float:
        flags = [m.enabled for _, m in fake_quant_modules(model)]
        was_training = model.training
        model.eval()
        set_fake_quant(model, self.quantized)
        try:
            return objectives.heldout_loss(model, self.ids, self.family, list(objectives.HELDOUT_RATIOS),
                                           batch_size=self.batch_size)["loss"]  # fmt: skip
        finally:
            if flags:
                set_fake_quant(model, flags[0])
            model.train(was_training)

    def record(self, what: str, step: int, loss: float) -> None:
        r = self.result
        if what == "trained":
            r.final = loss
            r.curve.append([step, loss])
        else:
            setattr(r, what, loss)

    def summary(self, recipe: Recipe) -> str:
        """One line: the float base, the PTQ model it started from (step 0) and the trained result."""
        r, q = self.result, recipe.quant
        parts = [f"float base {r.base:.4f}"]
        if r.ptq is not None:
            parts.append(f"PTQ {q.init} W{q.bits} (step 0) {r.ptq:.4f}")
        if r.curve:
            what = ("LoRA-QAT" if recipe.train.lora.r else "QAT") if q.enabled else "fine-tuned"
            parts.append(f"{what} (step {r.curve[-1][0]}) {r.final:.4f}")
        if r.merged is not None:
            parts.append(f"merged and re-quantized {r.merged:.4f}")
        return f"validation loss ({r.metric}; {r.data}, {r.windows} windows): " + " | ".join(parts)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...): reported as one line, exit code 1."""


@dataclass
class TrainState:
    """What the loop needs besides model/optimizer/RNG to resume: the optimizer step reached (the learning
    rate is a function of it), the micro-batches all processes together consumed (the data position, which a
    resume on another number of processes divides among its own), and how many processes wrote it."""

    step: int = 0
    batches: int = -1  # global micro-batches consumed; -1: not known (a checkpoint from before it was kept)
    world: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "batches": self.batches, "world": self.world}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.batches, self.world = int(sd["step"]), int(sd.get("batches", -1)), int(sd.get("world", 0))


CUSTOM_STATE = "custom_checkpoint_0.pkl"  # where accelerate's save_state puts the first registered object


def resume_skip(batches: int, world: int) -> tuple[int, int]:
    """(micro-batches each of `world` processes skips, micro-batches of the global order left out) to continue
    after `batches` global micro-batches: process p takes global batches p, p + world, ... (accelerate's
    sharding), so each skips batches // world; a remainder (a new world size that does not divide the position)
    is left out rather than seen twice."""
    return batches // world, batches % world


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def make_accelerator(recipe: Recipe) -> Accelerator:
    """The run's Accelerator. CPU: DDP over gloo (cpu=True); DeepSpeed over gloo (cpu=False, gloo named); FSDP2
    entered by hand, as accelerate only enters it on accelerators (qat/sharding.py)."""
    cuda = torch.cuda.is_available()
    deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    mp = recipe.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    out = Path(recipe.out_dir)
    accelerator = Accelerator(
        # CPU: DDP over gloo needs cpu=True; DeepSpeed on CPU needs gloo named explicitly and cpu=False.
        cpu=not cuda and not deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if not cuda and deepspeed else [],
        mixed_precision=mp,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=recipe.train.grad_accum, sync_with_dataloader=False
        ),
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if not cuda and _env_flag("ACCELERATE_USE_FSDP"):
        sharding.enter_fsdp(accelerator)
    return accelerator


def learning_rate(recipe: Recipe, step: int) -> float:
    """Linear warmup, then cosine from train.lr to train.lr · min_lr_ratio. A pure function of the step, so
    nothing to checkpoint and no scheduler for DeepSpeed to disagree with."""
    t = recipe.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float, scales_lr_ratio: float = 1.0) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases or quantizer scales); learned quantizer parameters
    (LSQ scales and zero points) in their own group, at `scales_lr_ratio` × the learning rate."""
    decay, rest, quantizer = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (quantizer if "weight_quantizer" in name else decay if p.ndim >= 2 else rest).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if quantizer:
        groups.append({"params": quantizer, "weight_decay": 0.0, "lr_ratio": scales_lr_ratio})
    return groups


def batches(accelerator: Accelerator, loader: DataLoader, start: int) -> Iterator[torch.Tensor]:
    """Micro-batches forever, epoch after epoch, starting at global micro-batch index `start`."""
    epoch, skip = divmod(start, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def checkpoints(out: Path) -> list[Path]:
    ckpts = [p for p in (out / "checkpoints").glob("step_*") if p.is_dir()]
    return sorted(ckpts, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int) -> Path:
    """accelerate save_state into a temporary directory, then an atomic rename; prune old checkpoints."""
    final = out / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def find_resume(recipe: Recipe) -> Path | None:
    how = recipe.train.resume
    if how == "none":
        return None
    if how == "auto":
        found = checkpoints(Path(recipe.out_dir))
        return found[-1] if found else None
    path = Path(how)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={how}: no such checkpoint directory")
    return path




def load_model(recipe: Recipe):
    """The recipe's base model. `model.family=coda` on a Qwen3 checkpoint adapts it (the same weights made
    bidirectional, as CoDA was made from Qwen3); any other family mismatch is an error."""
    m = recipe.model
    try:
        family = family_of(m.path)
        if family == "qwen3" and m.family == "coda":
            from qat.models.coda import from_qwen3

            return from_qwen3(m.path, dtype=DTYPES[m.dtype], attn=m.attn)
        if family != m.family:
            raise RecipeError(f"model.family={m.family} but {m.path} is a {family} checkpoint")
        return adapter(family).load(m.path, dtype=DTYPES[m.dtype], attn=m.attn)
    except (OSError, NotImplementedError) as e:  # hub unreachable, no weights, family not available
        raise RecipeError(f"model.path={m.path}: {str(e).strip().splitlines()[0]}") from None


def train(recipe: Recipe) -> Path:
    """Run the recipe; returns the path of the final artifact (written once train.steps are done)."""
    out = Path(recipe.out_dir)
    accelerator = make_accelerator(recipe)
    if accelerator.is_main_process:
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # prepare() reports what it swapped
    set_seed(recipe.train.seed)
    if accelerator.is_main_process:
        save_recipe(recipe, out)
        accelerator.init_trackers("tb", config=flatten(recipe))
    say = accelerator.print

    model, tokenizer = load_model(recipe)  # on every rank at once: ZeRO-3 initialisation is collective
    model.config.use_cache = False
    teacher = None
    block_ap = recipe.train.block_ap_steps > 0 and recipe.quant.enabled and find_resume(recipe) is None
    if (recipe.train.distills and recipe.train.kd_teacher == "frozen") or block_ap:
        # ZeRO-3 partitioned the model while loading it: a copy would share its partitions, so load it again
        teacher = load_model(recipe)[0] if sharding.zero3(model) else copy.deepcopy(model)
        teacher.eval().requires_grad_(False)
    val = None
    if recipe.train.eval_every:
        with accelerator.main_process_first():
            val = Validation.build(recipe, tokenizer)
        with sharding.gathered(model):
            val.record("base", 0, val(model))
    # transformers partitions at load time under ZeRO-3: PTQ needs the full weights, and GPTQ/AWQ rewrite them
    with sharding.gathered(model, modify=recipe.quant.calibrated):
        ptq = quantize_model(model, tokenizer, recipe, progress=accelerator.is_local_main_process)
    if ptq.layers:
        say(ptq.summary())
        if accelerator.is_main_process:
            (out / "ptq.json").write_text(json.dumps(asdict(ptq), indent=1) + "\n")
    say(f"model: {recipe.model.path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)")
    if val is not None and recipe.quant.enabled:
        with sharding.gathered(model):
            val.record("ptq", 0, val(model))
    if block_ap:  # a resumed run's checkpoint already holds its result
        with sharding.gathered(model, modify=True), sharding.gathered(teacher):
            say(reconstruct_blocks(recipe, model, teacher, tokenizer, accelerator.is_local_main_process))
        if val is not None:
            with sharding.gathered(model):
                say(f"validation after block-wise reconstruction: {val(model):.4f}")
    if not (recipe.train.distills and recipe.train.kd_teacher == "frozen"):
        teacher = None  # kept only for the reconstruction
    if recipe.train.lora.r:
        model = lora.wrap(model, recipe.train.lora)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(f"lora: r={recipe.train.lora.r} on {','.join(recipe.train.lora.targets)}; "
            f"{n_train / 1e6:.3f}M trainable parameters")  # fmt: skip

    done = True
    if recipe.train.steps > 0:
        model, done = fit(recipe, accelerator, model, tokenizer, teacher, val)
    final = finish(recipe, accelerator, model, tokenizer, ptq.bits) if done else out / "final"
    if val is not None and done and recipe.train.lora.r and recipe.train.steps > 0:  # what the artifact computes
        from qat.models import load

        merged = load(final)[0]
        for m in merged.modules():
            if isinstance(m, QuantizedLinear):
                m.path = "dense"  # exactly what the fake-quant model of the merged weights computes
        val.record("merged", recipe.train.steps, val(merged))
    if val is not None and done:
        say(val.summary(recipe))
        if accelerator.is_main_process:
            (out / "validation.json").write_text(json.dumps(asdict(val.result), indent=1) + "\n")
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # avoids a teardown abort under DeepSpeed
    return final


def reconstruct_blocks(recipe: Recipe, model, teacher, tokenizer, progress: bool) -> str:
    """Block-wise reconstruction (qat/blockap.py) on the recipe's calibration windows; its per-layer report."""
    t = recipe.train
    t0 = time.perf_counter()
    ids = calibration_ids(recipe, tokenizer, model.config).to(next(model.parameters()).device)
    reports = blockap.reconstruct(
        model, teacher, ids, t.block_ap_steps, t.block_ap_lr, recipe.quant.calib_batch,
        groups=lambda layer: param_groups(layer, 0.0, t.scales_lr_ratio), seed=t.seed, grad_clip=t.grad_clip,
        min_lr_ratio=t.min_lr_ratio, progress=progress,
    )  # fmt: skip
    lines = [f"block-wise reconstruction: {t.block_ap_steps} steps per layer, {ids.numel()} tokens, "
             f"{time.perf_counter() - t0:.1f} s", "layer  mse before  mse after"]  # fmt: skip
    lines += [f"{r.layer:5d}  {r.before:.3e}  {r.after:.3e}" for r in reports]
    return "\n".join(lines)


def fit(recipe: Recipe, accelerator: Accelerator, model, tokenizer, teacher, val: Validation | None = None
        ) -> tuple[torch.nn.Module, bool]:  # fmt: skip
    """The training loop; returns the (wrapped) model and whether train.steps were reached."""
    t = recipe.train
    out = Path(recipe.out_dir)
    say = accelerator.print
    world = accelerator.num_processes
    with accelerator.main_process_first():
        rows = data.build(recipe.data, tokenizer, t.seq_len, min_rows=t.batch_size * world)
    loader = DataLoader(
        rows, batch_size=t.batch_size, shuffle=True, drop_last=True, collate_fn=data.collate,
        generator=torch.Generator().manual_seed(t.seed),
    )  # fmt: skip
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay, t.scales_lr_ratio), lr=t.lr, betas=(0.9, 0.95))
    if accelerator.distributed_type == DistributedType.FSDP and (n := sharding.uniform_dtype(model)):
        say(f"fsdp: {n} parameters upcast to float32 (one dtype per shard unit; compute follows mixed precision)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # the recipe, not the launch config, owns these
        accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = t.grad_clip
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sharding.declare_quantizer_params(accelerator.unwrap_model(model))
    if teacher is not None:
        teacher = sharding.shard_teacher(accelerator, teacher)
        mine, total = sharding.held(teacher)
        say(f"teacher: frozen, {mine / 1e6:.3f}M of its {total / 1e6:.3f}M parameters held by each process")
        if t.teacher_cache:
            why = ("the teacher is sharded" if mine < total else "train.kd_hidden needs every layer"
                   if t.kd_hidden > 0 else teacher_cache.unsupported(teacher))  # fmt: skip
            if why:
                say(f"train.teacher_cache: off ({why})")
            else:
                teacher = teacher_cache.TeacherCache(teacher, t.teacher_cache)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    ckpt = find_resume(recipe)
    if ckpt is not None:
        saved = torch.load(ckpt / CUSTOM_STATE, weights_only=True) if (ckpt / CUSTOM_STATE).is_file() else {}
        before = int(saved.get("world", 0)) or world
        if before != world and accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise RecipeError(f"{ckpt} was written by {before} DeepSpeed processes; its partitioned optimizer state "
                              f"cannot be loaded by {world}: resume with {before} processes")  # fmt: skip
        fsdp_ckpt = (ckpt / "pytorch_model_fsdp_0").is_dir()
        if fsdp_ckpt != (accelerator.distributed_type == DistributedType.FSDP):  # FSDP itself reshards (DCP)
            how = "launch/fsdp.yaml on 2 or more processes" if fsdp_ckpt else "the engine it was written with"
            raise RecipeError(f"{ckpt} is {'an' if fsdp_ckpt else 'not an'} FSDP checkpoint: resume it with {how}")
        accelerator.load_state(str(ckpt))
        if state.batches < 0:  # an older checkpoint: written by this many processes
            state.batches = state.step * t.grad_accum * world
        say(f"resumed from {ckpt} at step {state.step}" + (f" (written by {before} processes, now {world})"
                                                            if before != world else ""))  # fmt: skip
    if state.batches < 0:
        state.batches = 0
    state.world = world
    skip, lost = resume_skip(state.batches, world)
    if lost:
        say(f"data: {lost} micro-batch(es) of the order left out ({state.batches} consumed by {world} processes)")
    say(f"data: {len(rows)} rows × {t.seq_len} tokens, {len(loader)} micro-batches per epoch per process; "
        f"processes: {world} ({accelerator.distributed_type.value})")  # fmt: skip

    unwrapped = accelerator.unwrap_model(model)
    micro = batches(accelerator, loader, skip)
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * world
    stop_at = min(t.steps, state.step + t.stop_after) if t.stop_after else t.steps
    bar = tqdm(total=t.steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="train")
    prev_codes = None

    def validate() -> None:  # every rank computes it (ZeRO-3 forwards are collective); the main one logs it
        loss = val(unwrapped)
        val.record("trained", state.step, loss)
        accelerator.log({"eval/loss": loss}, step=state.step)
        if accelerator.is_local_main_process:
            bar.write(f"step {state.step}: validation loss {loss:.4f}")

    if val is not None:
        accelerator.log({"eval/loss": val.result.ptq if recipe.quant.enabled else val.result.base}, step=state.step)
    tic, interval_losses = time.perf_counter(), []
    try:
        while state.step < stop_at:
            fq_on = state.step >= t.fake_quant_after
            if fq_on and state.step == t.fake_quant_after > 0:  # delayed fake quant switches on: fit the grids anew
                with sharding.gathered(unwrapped, modify=True):
                    n = rederive_scales(unwrapped)
                if n:
                    say(f"step {state.step}: fake quant on; {n} grids re-derived from the trained weights")
            set_fake_quant(unwrapped, fq_on)
            lr = learning_rate(recipe, state.step)
            for group in optimizer.param_groups:  # before the backward passes: DeepSpeed steps inside the last one
                group["lr"] = lr * group.get("lr_ratio", 1.0)
            losses, parts = [], {}
            for i in range(t.grad_accum):
                batch = next(micro)
                rng = objectives.noise_generator(accelerator.device, t.seed, accelerator.process_index, state.step, i)
                with accelerator.accumulate(model):
                    loss, parts = compute_loss(recipe, model, unwrapped, teacher, batch, fq_on, rng)
                    # Checked on every rank *before* the backward: DeepSpeed's engine steps inside it.
                    seen = accelerator.reduce(loss.detach().float(), "mean").item()
                    if not math.isfinite(seen):
                        last = checkpoints(out)
                        raise TrainingError(
                            f"loss is {seen} at step {state.step}; stopped before the update. "
                            f"Last good checkpoint: {last[-1] if last else 'none (set train.save_every)'}"
                        )
                    accelerator.backward(loss)
                losses.append(loss.detach())
            step_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batches += t.grad_accum * world
            interval_losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")

            if state.step % t.log_every == 0 or state.step == t.steps:
                elapsed = time.perf_counter() - tic
                logs = {
                    "train/loss": sum(interval_losses) / len(interval_losses),
                    "train/lr": lr,
                    "train/tokens_per_s": tokens_per_step * len(interval_losses) / elapsed,
                    "train/fake_quant": float(fq_on),
                }
                logs.update({k: v.item() for k, v in parts.items()})
                if grad_norm is not None:
                    logs["train/grad_norm"] = float(grad_norm)
                if t.quant_stats and recipe.quant.enabled:
                    with sharding.gathered(unwrapped):
                        stats, prev_codes = quant_stats(unwrapped, prev_codes)
                    logs.update(stats)
                accelerator.log(logs, step=state.step)
                tic, interval_losses = time.perf_counter(), []
            if val is not None and (state.step % t.eval_every == 0 or state.step == t.steps):
                validate()
            if (t.save_every and state.step % t.save_every == 0) or state.step == stop_at < t.steps:
                save_checkpoint(accelerator, out, state.step, t.keep_checkpoints)
    except KeyboardInterrupt:
        if world > 1:  # ranks may be anywhere; a collective save could hang
            raise
        bar.close()
        path = save_checkpoint(accelerator, out, state.step, t.keep_checkpoints)
        say(f"\ninterrupted: saved {path} (step {state.step}); continue with train.resume=auto")
        raise SystemExit(130) from None
    bar.close()
    if isinstance(teacher, teacher_cache.TeacherCache):
        say(f"train.teacher_cache: {teacher.hits} batches read from {t.teacher_cache}, {teacher.misses} computed")
    if state.step < t.steps:
        say(f"stopped at step {state.step}/{t.steps} (train.stop_after); continue with train.resume=auto")
    return model, state.step == t.steps


def compute_loss(recipe: Recipe, model, unwrapped, teacher, batch: dict, fq_on: bool, rng: torch.Generator):
    """(loss, {log tag: value}) for one micro-batch: the family's loss (next-token CE for qwen3, masked-diffusion
    CE for coda, see qat/objectives.py), mixed with distillation on the same inputs when train.kd > 0, plus
    hidden-state distillation when train.kd_hidden > 0."""
    t = recipe.train
    ex = objectives.example(recipe.model.family, batch, unwrapped.config, recipe.diffusion, rng)
    hidden = t.kd_hidden > 0
    sel = objectives.scored_positions(ex)  # the LM heads run only where the losses read (objectives.scored_head)
    with objectives.scored_head(unwrapped, sel):
        out = model(input_ids=ex.inputs, output_hidden_states=hidden)
    if not t.distills:
        return objectives.ce_loss(out.logits, ex), {}
    with torch.no_grad():
        if teacher is not None:
            with objectives.scored_head(getattr(teacher, "module", teacher), sel):  # a ZeRO-3 engine's model
                t_out = teacher(input_ids=ex.inputs, output_hidden_states=hidden)
        else:  # the same weights with fake quant off (and adapters off): the float model the student is pulled to
            set_fake_quant(unwrapped, False)
            with unwrapped.disable_adapter() if lora.is_wrapped(unwrapped) else nullcontext(), \
                    objectives.scored_head(unwrapped, sel):  # fmt: skip
                t_out = model(input_ids=ex.inputs, output_hidden_states=hidden)
            set_fake_quant(unwrapped, fq_on)
    T = t.kd_temperature
    log_s, w = objectives.log_probs(out.logits, ex, T)
    kd = objectives.kl(log_s, objectives.log_probs(t_out.logits, ex, T)[0], w, ex, T, t.kd_reverse)
    with torch.no_grad() if t.kd == 1 else nullcontext():  # pure distillation: CE is only logged
        ce = objectives.nll(log_s, w, ex) if T == 1 else objectives.ce_loss(out.logits, ex)  # T = 1: KD's log-softmax
    loss, parts = (1 - t.kd) * ce + t.kd * kd, {"train/ce_loss": ce.detach(), "train/kd_loss": kd.detach()}
    if hidden:
        h = objectives.hidden_loss(out.hidden_states, t_out.hidden_states)
        loss, parts["train/hidden_loss"] = loss + t.kd_hidden * h, h.detach()
    return loss, parts


def finish(recipe: Recipe, accelerator: Accelerator, model, tokenizer, bits: dict[str, int] | None = None) -> Path:
    """Convert and save `<out_dir>/final/` (main process), report its size."""
    final = Path(recipe.out_dir) / "final"
    accelerator.wait_for_everyone()
    if sharding.sharded(accelerator.unwrap_model(model)):  # gather a full state dict into a fresh CPU model
        state = sharding.full_state_dict(accelerator, model)
        if accelerator.is_main_process:
            from transformers.integrations import deepspeed as hf_ds

            keep = hf_ds._hf_deepspeed_config_weak_ref
            hf_ds.unset_hf_deepspeed_config()  # a plain CPU model: no collective zero.Init on one rank
            try:
                model, _ = load_model(recipe)
            finally:
                hf_ds._hf_deepspeed_config_weak_ref = keep
            prepare(model, recipe.quant, bits)  # the shells; weights and quantizer state come from the state dict
            if recipe.train.lora.r:
                model = lora.wrap(model, recipe.train.lora)  # the same keys as the trained model's
            model.load_state_dict(state)
    else:
        model = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if lora.is_wrapped(model):
            model = lora.merge(model)  # W + BA, then quantized on the trained grid by convert (qat/lora.py)
        model = convert(model.cpu())  # training is over: the model can be baked in place
        if final.exists():
            shutil.rmtree(final)
        save_artifact(model, tokenizer, recipe, final)
        r = size_report(model, final)
        accelerator.print(
            f"final: {final} ({r['bytes'] / 2**20:.2f} MiB; bf16 would be {r['bf16_bytes'] / 2**20:.2f} MiB, "
            f"ratio {r['ratio']:.3f})"
        )
    accelerator.wait_for_everyone()
    return final


def main(argv: list[str] | None = None) -> Path:
    try:
        with exit_on_error(FileNotFoundError):  # user errors: one line, exit code 2
            recipe = load_recipe(sys.argv[1:] if argv is None else argv)
            check_path(recipe.model.path)
            return train(recipe)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        # Everything is saved and the process group destroyed, yet DeepSpeed's CPU communication threads can
        # still abort the interpreter's shutdown ("terminate called without an active exception", seen in CI
        # after a successful ZeRO-3 run): skip the C++ teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
