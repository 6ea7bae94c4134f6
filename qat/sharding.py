"""Parameters that live in shards: what the trainer needs from DeepSpeed ZeRO-3 and FSDP2 beyond `prepare`.

Under DDP and ZeRO-1/2 every rank holds every parameter and nothing here does anything. Under ZeRO-3 and FSDP2 a
rank holds 1/world of each parameter between forwards, so whatever reads or writes weights *outside* a forward
(re-deriving quantizer grids when delayed fake quant switches on, code-flip statistics, the final artifact) must
gather them first, and a frozen teacher must be sharded the same way or it costs a full model copy per rank:

    engine    between forwards              gather                                 teacher
    ZeRO-3    empty tensors with `ds_id`    deepspeed.zero.GatheredParameters      an inference engine (no optimizer)
    FSDP2     DTensors, Shard(0)            full_tensor(); writes re-scattered      fully_shard, the student's policy

FSDP on CPU: accelerate sets `DistributedType.FSDP` only inside its GPU branch, so a CPU launch with
`launch/fsdp.yaml` would silently train unsharded. `enter_fsdp` switches accelerate's (process-wide) state to FSDP
with the plugin the launcher's environment describes; from then on accelerate's own FSDP2 code path runs
(`fully_shard` per decoder layer, DCP sharded checkpoints, the full state dict), on gloo. On GPUs accelerate
enters it itself and `enter_fsdp` does nothing.

Not covered: FSDP1 (FSDP2 only), tensor/context parallelism, CPU offload of parameters under FSDP.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


def enter_fsdp(accelerator: Accelerator) -> None:
    """Make accelerate run its FSDP2 path on CPU processes launched with an FSDP config (see the module doc)."""
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.FSDP or accelerator.num_processes < 2:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch exported
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU: only fsdp_version: 2 is supported (launch/fsdp.yaml)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # AcceleratorState copies PartialState's fields whenever it is constructed again: set both
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def uniform_dtype(model: torch.nn.Module) -> int:
    """FSDP2 shards one dtype per unit: a bf16 model with float32 quantizer scales is held in float32 (master
    weights; mixed precision still computes in bf16). Returns how many parameters were upcast."""
    if len({p.dtype for p in model.parameters()}) < 2:
        return 0
    upcast = [p for p in model.parameters() if p.dtype != torch.float32]
    for p in upcast:
        p.data = p.data.float()
    return len(upcast)


def fsdp(model: torch.nn.Module) -> bool:
    """Whether FSDP2 has sharded the model (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def zero3(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned the parameters (each then carries a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def sharded(model: torch.nn.Module) -> bool:
    return zero3(model) or fsdp(model)


def gathered(model: torch.nn.Module, modify: bool = False):
    """Full parameters outside forward, on every rank (collective), when sharded; a no-op otherwise.
    modify=True keeps in-place changes (rank 0's, which every rank must have computed identically)."""
    if zero3(model):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0 if modify else None)
    if fsdp(model):
        return _fsdp_gathered(model, modify)
    return nullcontext()


@contextmanager
def _fsdp_gathered(model: torch.nn.Module, modify: bool) -> Iterator[None]:
    """Swap every DTensor parameter for a plain one holding the full tensor; swap back (and, with modify,
    scatter the new values into the local shards) on exit. The DTensor objects themselves never change
    identity, so FSDP's bookkeeping and the optimizer's references stay valid."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor

    for m in model.modules():  # a unit left unsharded after a forward (reshard_after_forward=False) shards now
        if isinstance(m, FSDPModule):
            m.reshard()
    full: dict[int, torch.nn.Parameter] = {}  # by id: a tied parameter is gathered once and stays tied
    swapped = []
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in full:
                    full[id(p)] = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
                m._parameters[name] = full[id(p)]
                swapped.append((m, name, p))
    try:
        yield
    finally:
        done = set()
        for m, name, p in swapped:
            m._parameters[name] = p
            if modify and id(p) not in done:
                done.add(id(p))
                with torch.no_grad():
                    shard = distribute_tensor(full[id(p)].data.to(p.dtype), p.device_mesh, p.placements)
                    p.to_local().copy_(shard.to_local())


def declare_quantizer_params(model: torch.nn.Module) -> int:
    """ZeRO-3 fetches a module's own parameters before its forward. FakeQuantLinear reads its child quantizer's
    learned scale without calling the child, which DeepSpeed discovers only on first use; when fake quant
    switches on mid-run (train.fake_quant_after), that changes the fetch order DeepSpeed traced on the first
    step, and its prefetcher stops with "tracing error". Declared up front, the order never changes. Call after
    the engine partitioned the model; returns how many were declared."""
    if not zero3(model):
        return 0
    import deepspeed

    from qat.modules import FakeQuantLinear

    n = 0
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            for p in m.weight_quantizer.parameters():
                deepspeed.zero.register_external_parameter(m, p)
                n += 1
    return n


def held(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model): what sharding saves, measured."""
    from torch.distributed.tensor import DTensor

    mine = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            mine, total = mine + p.ds_tensor.numel(), total + p.ds_numel
        elif isinstance(p, DTensor):
            mine, total = mine + p.to_local().numel(), total + p.numel()
        else:
            mine, total = mine + p.numel(), total + p.numel()
    return mine, total


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, on the main process (collective; {} on the others)."""
    if zero3(model):
        inner = accelerator.unwrap_model(model)  # also when never wrapped by an engine (train.steps=0)
        with gathered(inner):
            return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()} if (
                accelerator.is_main_process) else {}  # fmt: skip
    state = accelerator.get_state_dict(model)  # FSDP2: full tensors gathered to rank 0
    return {k: v.detach().cpu() for k, v in state.items()} if accelerator.is_main_process else {}


def shard_teacher(accelerator: Accelerator, teacher: torch.nn.Module) -> torch.nn.Module:
    """The frozen teacher, placed like the student: sharded by FSDP2 with the student's policy, partitioned by a
    ZeRO-3 inference engine (no optimizer), or whole on the device (DDP, ZeRO-1/2: a frozen model has no
    optimizer state or gradients to shard). Call after the student's `prepare`."""
    teacher.eval().requires_grad_(False)
    if accelerator.distributed_type == DistributedType.FSDP:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, teacher)
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        config = copy.deepcopy(plugin.deepspeed_config)  # resolved by the student's prepare: no "auto" left
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        engine = deepspeed.initialize(model=teacher, config_params=config)[0]
        engine.eval()
        return engine
    return teacher.to(accelerator.device)
