"""Recipes: a typed schema with defaults, a YAML diff per recipe, and `key=value` overrides.

A run is described by one `Recipe` (nested dataclasses below). Its value is resolved in three layers,
later layers winning:

    defaults (this file)  ⊕  recipes/NAME.yaml  ⊕  command-line `a.b=value` pairs

so a recipe file is a short diff from the defaults, and a recipe may start from another one (`extends: NAME`
as its first key: the parent's layers, then its own, so the widths of one family share a base and differ only
in the lines that say so), and `recipe=tiny_qwen3_int4 train.lr=1e-4` tweaks one
value. The merge is plain OmegaConf on a structured (dataclass) config: an unknown key or a value of the
wrong type fails loudly, and `OmegaConf.to_object` hands the code real dataclasses whose `__post_init__`
checks the values the type system cannot (bits ∈ {2,3,4,8,16}, …). Every failure is a `RecipeError`
with one readable line; entry points turn it into exit code 2 (`exit_on_error`).

The resolved recipe is written next to every output (`save_recipe`), so a result always carries the
exact settings that produced it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


class RecipeError(ValueError):
    """A recipe or command line that cannot be run; the message is one line for the user."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise RecipeError(msg)


@dataclass
class ModelConfig:
    family: str = "qwen3"  # qwen3 | coda
    path: str = "checkpoints/tiny-qwen3"  # local directory or hub id
    dtype: str = "float32"  # master-weight dtype: float32 | bfloat16 (compute dtype comes from train.mixed_precision)
    attn: str = "sdpa"  # eager | sdpa | flash_attention_2 (falls back to sdpa when flash-attn is unusable)

    def __post_init__(self) -> None:
        _check(self.family in ("qwen3", "coda"), f"model.family must be qwen3 or coda, got {self.family!r}")
        _check(
            self.dtype in ("float32", "bfloat16"),
            f"model.dtype must be float32 or bfloat16, got {self.dtype!r}",
        )
        _check(
            self.attn in ("eager", "sdpa", "flash_attention_2"),
            f"model.attn must be eager, sdpa or flash_attention_2, got {self.attn!r}",
        )


@dataclass
class QuantConfig:
    """Weight quantization settings (the `quant` section of a recipe); see qat/quant.py for the math and
    qat/ptq/ for the PTQ initialisations (gptq, awq, mixed precision, calibration)."""

    # 2 | 3 | 4 | 8; 16 = no quantization (the float baseline); a non-integer (3.5) = mixed precision: per-layer
    # bits from `mixed_choices`, allocated by Hessian sensitivity to meet that average (qat/ptq/mixed.py)
    bits: float = 4
    group_size: int = 128  # weights per scale along the input dimension; -1 = one scale per output channel
    symmetric: bool = True  # signed grid, zero point 0; False = unsigned grid with an integer zero point
    init: str = "rtn"  # where the quantizer state starts: rtn | gptq | awq (the PTQ solution; QAT continues from it)
    mse: bool = False  # at init, search a clipping ratio per group that minimises the squared error
    scales: str = "static"  # static: fixed at init | dynamic: re-derived from w every forward | lsq: learned
    skip: list[str] = field(default_factory=lambda: ["lm_head", "*embed*"])  # fnmatch patterns on module names
    mixed_choices: list[int] = field(default_factory=lambda: [2, 3, 4, 8])  # bits a layer may get (mixed)
    # calibration (gptq, awq, mixed precision): equal-length packed windows, streamed one decoder layer at a time
    calib_data: str = ""  # a data.path (file, directory, stdlib, hub id); "" = the recipe's training data
    calib_field: str = ""  # its text column; "" = data.text_field
    calib_samples: int = 128  # windows
    calib_seq_len: int = 512  # tokens per window
    calib_batch: int = 8  # windows per forward
    calib_mask: str = "auto"  # auto: diffusion models see noised windows (as in training), AR models clean | none
    calib_ratios: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # mask ratios, cycled
    calib_prefix: float = 0.0  # probability that a noised window keeps a random clean prefix (CoDA's S1)
    gptq_damp: float = 0.01  # relative dampening: H += damp · mean(diag H) · I (raised automatically on failure)
    gptq_block: int = 128  # columns per lazy-update block
    act_order: bool = True  # process columns by descending Hessian diagonal (static groups: layout unchanged)
    awq_clip: bool = True  # AWQ: also search a per-group clipping range

    def __post_init__(self) -> None:
        if float(self.bits).is_integer():
            self.bits = int(self.bits)
            _check(self.bits in (2, 3, 4, 8, 16), f"quant.bits must be one of 2, 3, 4, 8, 16, got {self.bits}")
        else:
            lo, hi = min(self.mixed_choices, default=0), max(self.mixed_choices, default=0)
            _check(
                set(self.mixed_choices) <= {2, 3, 4, 8} and lo <= self.bits <= hi,
                f"quant.bits={self.bits} (mixed precision) must lie within quant.mixed_choices={self.mixed_choices}"
                " (a subset of 2, 3, 4, 8)",
            )
        _check(
            self.group_size == -1 or self.group_size > 0,
            f"quant.group_size must be -1 or > 0, got {self.group_size}",
        )
        _check(self.init in ("rtn", "gptq", "awq"), f"quant.init must be rtn, gptq or awq, got {self.init!r}")
        _check(
            self.scales in ("static", "dynamic", "lsq"),
            f"quant.scales must be static, dynamic or lsq, got {self.scales!r}",
        )
        _check(
            not (self.mse and self.scales == "dynamic"),
            "quant.mse needs static or lsq scales (dynamic re-derives them)",
        )
        _check(
            not (self.init != "rtn" and self.scales == "dynamic"),
            f"quant.init={self.init} needs static or lsq scales: dynamic scales would discard the PTQ solution",
        )
        _check(self.calib_mask in ("auto", "none"), f"quant.calib_mask must be auto or none, got {self.calib_mask!r}")
        _check(
            all(0 < r <= 1 for r in self.calib_ratios), f"quant.calib_ratios must be in (0, 1], got {self.calib_ratios}"
        )
        for k in ("calib_samples", "calib_seq_len", "calib_batch", "gptq_block"):
            _check(getattr(self, k) >= 1, f"quant.{k} must be >= 1, got {getattr(self, k)}")
        _check(0 <= self.calib_prefix <= 1, f"quant.calib_prefix must be in [0, 1], got {self.calib_prefix}")
        _check(self.gptq_damp > 0, f"quant.gptq_damp must be > 0, got {self.gptq_damp}")

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @property
    def mixed(self) -> bool:
        """Mixed precision: a non-integer average-bits budget."""
        return not float(self.bits).is_integer()

    @property
    def calibrated(self) -> bool:
        """Whether initialisation needs calibration data (anything but uniform RTN)."""
        return self.enabled and (self.init != "rtn" or self.mixed)


@dataclass
class DataConfig:
    path: str = "stdlib"  # jsonl/parquet file, directory of source files, `stdlib` (this Python's), pkg:NAME, hub id
    subset: str = ""  # hub dataset configuration name (e.g. educational_instruct), if it has several
    format: str = "packed"  # packed: documents concatenated into rows | chat: one prompt/response pair per row
    glob: str = "*.py"  # files taken from a directory (recursively)
    text_field: str = "content"  # packed: column holding the code in jsonl/parquet/hub data
    prompt_field: str = "instruction"  # chat: the user turn
    response_field: str = "output"  # chat: the assistant turn
    split: str = "train"  # directories: train | validation | all (by a hash of each file's path); hub: its split
    val_fraction: float = 0.05  # directories: share of files (by path hash) in the validation split
    eval_path: str = ""  # validation data of train.eval_every; "" = the validation split of data.path
    max_docs: int = 0  # use the first N documents (sorted, deterministic); 0 = all

    def __post_init__(self) -> None:
        _check(self.max_docs >= 0, f"data.max_docs must be >= 0, got {self.max_docs}")
        _check(0 <= self.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        _check(self.format in ("packed", "chat"), f"data.format must be packed or chat, got {self.format!r}")


@dataclass
class DiffusionConfig:
    """Masked-diffusion training of the coda family (qat/objectives.py); ignored by causal models."""

    eps: float = 1e-3  # masking ratio sigma ~ U(eps, 1) per sequence
    prefix_prob: float = 0.0  # S1: a row keeps a random prefix unmasked (packed rows only)
    truncate_prob: float = 0.0  # S2: a row's random suffix becomes unsupervised padding (packed rows only)
    block_prob: float = 0.0  # S3: a batch masks contiguous windows instead of single tokens
    block_sizes: list[int] = field(default_factory=lambda: [2, 4, 8])  # S3 window lengths, one drawn per batch

    def __post_init__(self) -> None:
        _check(0 < self.eps < 1, f"diffusion.eps must be in (0, 1), got {self.eps}")
        for k in ("prefix_prob", "truncate_prob", "block_prob"):
            _check(0 <= getattr(self, k) <= 1, f"diffusion.{k} must be in [0, 1], got {getattr(self, k)}")
        _check(all(k >= 1 for k in self.block_sizes), f"diffusion.block_sizes must be >= 1, got {self.block_sizes}")


@dataclass
class LoraConfig:
    """LoRA-QAT (qat/lora.py): low-rank adapters on the fake-quantized linears, the base frozen; r = 0: off."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    scales: bool = False  # also train the learned (LSQ) quantizer scales and zero points
    # requant: plain LoRA, merged as Q(W) + BA re-quantized on the grid | group: QA-LoRA adapters on group-pooled
    # inputs, whose delta is constant within each quantization group and folds exactly into a per-group offset
    merge: str = "requant"

    def __post_init__(self) -> None:
        _check(self.r >= 0, f"train.lora.r must be >= 0, got {self.r}")
        _check(self.merge in ("requant", "group"), f"train.lora.merge must be requant or group, got {self.merge!r}")
        _check(self.alpha > 0, f"train.lora.alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"train.lora.dropout must be in [0, 1), got {self.dropout}")
        _check(bool(self.targets), "train.lora.targets must name at least one module")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps; 0 = PTQ only (prepare → convert → save)
    lr: float = 1e-5
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 0  # linear warmup steps
    weight_decay: float = 0.0  # on 2-D weights only
    scales_lr_ratio: float = 1.0  # learned quantizer scales/zero points (quant.scales=lsq) train at this × lr
    batch_size: int = 8  # sequences per device per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 512  # tokens per packed sequence
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    kd: float = 0.0  # distillation weight: loss = (1 - kd) * CE + kd * T² * KL(teacher ‖ student)
    kd_temperature: float = 1.0
    # share of reverse KL(student ‖ teacher) in the distillation term, the rest forward KL (BitDistiller's CAKLD
    # mixes them by the teacher's confidence: mode-seeking helps a low-bit student that cannot cover every mode)
    kd_reverse: float = 0.0
    kd_hidden: float = 0.0  # + kd_hidden · mean relative hidden-state error per layer vs the teacher (objectives)
    kd_teacher: str = "self"  # self: same weights, fake quant off (no copy) | frozen: a frozen copy of the start
    # a directory where a frozen teacher's last hidden state per batch is kept and read back by later runs with the
    # same base, batches and precision (qat/teacher_cache.py; eval.ablate sets it for the QAT cells); "" = off
    teacher_cache: str = ""
    fake_quant_after: int = 0  # delayed fake quant: train in float for this many steps first
    # block-wise reconstruction before end-to-end QAT (qat/blockap.py): steps per decoder layer on the calibration
    # windows, against a float copy of the model; 0 = off
    block_ap_steps: int = 0
    block_ap_lr: float = 1e-4
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | bf16 | fp16
    seed: int = 0
    log_every: int = 1
    quant_stats: bool = True  # log quantization error and integer-level flips every log step
    save_every: int = 0  # save_state every N steps (0 = never mid-run)
    keep_checkpoints: int = 2  # newest N checkpoints kept
    resume: str = "none"  # none | auto (newest checkpoint in out_dir, else start fresh) | path to a checkpoint
    stop_after: int = 0  # end this invocation after N more steps, with a checkpoint (time-boxed jobs)
    eval_every: int = 0  # validation loss (eval.heldout's metric) every N steps, at start and end; 0 = off
    eval_rows: int = 64  # validation windows of seq_len tokens (the first N of data.eval_path / validation split)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def distills(self) -> bool:
        """Whether training needs a teacher (logit or hidden-state distillation)."""
        return self.kd > 0 or self.kd_hidden > 0

    def __post_init__(self) -> None:
        for k in ("steps", "warmup", "fake_quant_after", "save_every", "stop_after", "eval_every", "block_ap_steps"):
            _check(getattr(self, k) >= 0, f"train.{k} must be >= 0, got {getattr(self, k)}")
        _check(self.lr >= 0, f"train.lr must be >= 0, got {self.lr}")
        _check(self.block_ap_lr > 0, f"train.block_ap_lr must be > 0, got {self.block_ap_lr}")
        _check(self.scales_lr_ratio >= 0, f"train.scales_lr_ratio must be >= 0, got {self.scales_lr_ratio}")
        for k in ("batch_size", "grad_accum", "seq_len", "log_every", "keep_checkpoints", "eval_rows"):
            _check(getattr(self, k) >= 1, f"train.{k} must be >= 1, got {getattr(self, k)}")
        _check(0.0 <= self.kd <= 1.0, f"train.kd must be in [0, 1], got {self.kd}")
        if self.mixed_precision in (False, "False"):  # YAML reads a bare `no` as false (OmegaConf: "False")
            self.mixed_precision = "no"
        _check(self.kd_hidden >= 0, f"train.kd_hidden must be >= 0, got {self.kd_hidden}")
        _check(0.0 <= self.kd_reverse <= 1.0, f"train.kd_reverse must be in [0, 1], got {self.kd_reverse}")
        _check(self.kd_temperature > 0, f"train.kd_temperature must be > 0, got {self.kd_temperature}")
        _check(
            self.kd_teacher in ("self", "frozen"),
            f"train.kd_teacher must be self or frozen, got {self.kd_teacher!r}",
        )
        _check(
            self.mixed_precision in ("auto", "no", "bf16", "fp16"),
            f"train.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}",
        )


@dataclass
class Recipe:
    name: str = "default"
    out_dir: str = "checkpoints/${name}"  # outputs: recipe.yaml, logs/, checkpoints/, final/
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        q, t = self.quant, self.train
        _check(
            not (t.lora.r and t.lora.scales and q.scales != "lsq"),
            "train.lora.scales=true trains learned scales: set quant.scales=lsq",
        )
        _check(
            not (q.init == "gptq" and q.enabled and t.distills and t.kd_teacher == "self"),
            "quant.init=gptq rewrites the weights onto the grid, so the 'self' teacher (fake quant off) would be "
            "the quantized model: use train.kd_teacher=frozen",
        )


def _recipe_file(name: str) -> Path:
    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise RecipeError(f"unknown recipe {name!r} (no {path}); shipped recipes: {known}")
    return path


def _recipe_layers(name: str, chain: tuple[str, ...] = ()) -> list:
    """The YAML layers of recipe `name`, its `extends:` ancestors first (a recipe names one parent)."""
    if name in chain:
        raise RecipeError(f"recipe {name!r} extends itself: {' -> '.join((*chain, name))}")
    cfg = OmegaConf.load(_recipe_file(name))
    parent = cfg.pop("extends", None)
    return [*(_recipe_layers(str(parent), (*chain, name)) if parent else []), cfg]


def _one_line(e: Exception) -> str:
    msg = getattr(e, "msg", None) or str(e)
    key = getattr(e, "full_key", None)
    msg = msg.strip().splitlines()[0]
    return f"{key}: {msg}" if key and key not in msg else msg


def _dotlist(args: list[str]):
    """`a.b=value` arguments as an OmegaConf node; a value YAML cannot read is a RecipeError naming it."""
    try:
        return OmegaConf.from_dotlist(args)
    except yaml.YAMLError:
        for a in args:  # which one (parsed alone only on this error path)
            try:
                OmegaConf.from_dotlist([a])
            except yaml.YAMLError as e:
                what = getattr(e, "problem", None) or type(e).__name__
                raise RecipeError(f"cannot read {a!r} ({what}): quote values that YAML treats specially, "
                                  "e.g. \"quant.skip=['*embed*']\"") from None  # fmt: skip
        raise


def load_recipe(argv: Sequence[str] = ()) -> Recipe:
    """Resolve `["recipe=NAME", "a.b=value", ...]` into a validated Recipe; raises RecipeError."""
    args = list(argv)
    for a in args:
        _check("=" in a and not a.startswith("-"), f"arguments are key=value pairs, got {a!r}")
    name = "default"
    for a in [a for a in args if a.startswith("recipe=")]:
        name = a.split("=", 1)[1]
        args.remove(a)
    try:
        layers = [OmegaConf.structured(Recipe)]
        if name != "default":
            files = _recipe_layers(name)
            if "name" not in files[-1]:
                files[-1].name = Path(name).stem  # a parent's name never leaks into its children
            layers += files
        layers.append(_dotlist(args))
        cfg = OmegaConf.merge(*layers)
        return OmegaConf.to_object(cfg)
    except RecipeError:
        raise
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, RecipeError) else e
        raise RecipeError(_one_line(cause)) from None


def parse_cli(schema: type, argv: Sequence[str]) -> Any:
    """`key=value` arguments onto a dataclass schema (the eval entry points); any failure is a RecipeError."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), _dotlist(list(argv))))
    except RecipeError:
        raise
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, RecipeError) else e
        raise RecipeError(_one_line(cause)) from None


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def from_yaml(text: str) -> Recipe:
    """Inverse of `to_yaml` (validated against the schema)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.create(text)))


def save_recipe(recipe: Recipe, directory: str | Path) -> Path:
    path = Path(directory) / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(recipe))
    return path


def flatten(recipe: Recipe) -> dict[str, Any]:
    """{"quant.bits": 4, ...}: the form TensorBoard's hparams accept (lists become strings)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True))
    return out


@contextmanager
def exit_on_error(*errors: type[BaseException]) -> Iterator[None]:
    """Turn user errors into one line on stderr and exit code 2 (no traceback)."""
    try:
        yield
    except (RecipeError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
