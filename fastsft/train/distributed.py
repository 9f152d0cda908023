"""Data parallelism for `fastsft train`: one process per device, launched by torchrun.

    torchrun --nproc-per-node 8 -m fastsft train config.yaml distributed.strategy=fsdp

`Distributed.from_env` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and joins the process group (NCCL on
CUDA, gloo on CPU, so the same code is tested with CPU processes). Strategies:

- "fsdp": FSDP2. `fully_shard` on every decoder layer (the model's `_no_split_modules` classes), then on the
  root (embeddings, final norm and lm_head, tied or not, are one unit that the loss's forward gathers).
  Parameters, gradients and AdamW states are sharded: fp32 master weights cost 16 bytes / world_size per
  parameter. With bf16 compute the parameters are all-gathered in bf16 (MixedPrecisionPolicy) and gradients
  reduce-scattered in fp32; with fp32 compute everything stays fp32. Only rank 0 reads the weights: the other
  ranks shard a weightless meta-device copy and receive their shards (`materialize`).
- "ddp": a replicated model (`DistributedDataParallel`), gradients all-reduced once per optimizer step
  (`no_sync` on the step's earlier micro-batches). For models whose optimizer states fit on one device.
- "none": one process.

Gradient scale: both strategies average gradients over ranks, so the loop divides each rank's summed loss by
the supervised tokens of the whole step on all ranks and backpropagates it times world_size: the average over
ranks is then exactly the sum over every rank's supervised tokens divided by their total count, the gradient
of one process that ran all micro-batches (tested: 2 processes with grad_accum g equal 1 process with 2g).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class DistributedError(RuntimeError):
    """The processes of a run disagree, or the launch does not match the config."""


@dataclass
class Distributed:
    """This process's place in the run. `strategy` is "none" for a single process."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    strategy: str = "none"
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this object joined the process group, so `close` leaves it

    # ---------------------------------------------------------------------------------------------- set-up

    @classmethod
    def from_env(cls, strategy: str = "auto", timeout_minutes: float = 60.0) -> Distributed:
        """Join torchrun's process group when WORLD_SIZE > 1; pick the device (cuda:LOCAL_RANK or cpu)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if world_size == 1:  # any strategy: one process has nothing to shard or replicate
            cuda = torch.cuda.is_available()
            return cls(device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
        if strategy == "none":
            raise DistributedError(
                f"distributed.strategy=none but WORLD_SIZE={world_size}: launch one process, or use fsdp / ddp"
            )
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device, backend = torch.device("cuda", local_rank), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        owns_group = not dist.is_initialized()
        if owns_group:
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, timeout=_dt.timedelta(minutes=timeout_minutes), **kwargs)
        return cls(world_size, rank, local_rank, "fsdp" if strategy == "auto" else strategy, device, owns_group)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ---------------------------------------------------------------------------------------- collectives

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place; returns `tensor` (unchanged when alone)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first; the others enter it after rank 0 is through (e.g. to reuse a cache)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def check_same(self, what: str, value: str) -> None:
        """Raise on every rank unless every rank computed the same `value` (a fingerprint of `what`)."""
        values = self.all_gather_object(value)
        if len(set(values)) > 1:
            ranks = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise DistributedError(
                f"the ranks disagree about {what} ({ranks}); every rank must read the same data with the same "
                "tokenizer and settings (is data.cache_dir on a shared filesystem, or the data file the same?)"
            )

    # ------------------------------------------------------------------------------------------- the model

    def wrap(self, model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
        """Shard (fsdp) or replicate (ddp) a patched model that is on `self.device` (or, fsdp, on the meta
        device: see `materialize`). compute_dtype bf16: FSDP all-gathers the parameters in bf16 (half the
        traffic; the fp32 shards stay the master weights) and reduce-scatters gradients in fp32."""
        if not self.enabled:
            return model
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # broadcast_buffers=False: the only buffers are RoPE tables, identical on every rank, and a
            # broadcast would be a collective in every forward (eval and generation included).
            return DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False
            )
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        layers = decoder_layers(model)
        if not layers:
            raise DistributedError(
                f"distributed.strategy=fsdp: found no decoder layers in {type(model).__name__} (looked for the "
                "classes in its _no_split_modules); use distributed.strategy=ddp"
            )
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model

    def materialize(self, model: nn.Module, source: nn.Module | None) -> None:
        """Give a model sharded on the meta device (`wrap` of a weightless copy) its values: allocate this
        rank's shards on `self.device`, then scatter rank 0's `source` (the whole model, on the CPU; None on
        the other ranks) into them, and broadcast its buffers (e.g. RoPE tables: not in the state dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.is_main and source is None:
            raise ValueError("materialize: rank 0 needs the model holding the weights")
        model.to_empty(device=self.device)
        full = source.state_dict() if self.is_main else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)
        source_buffers = dict(source.named_buffers()) if self.is_main else {}
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if self.is_main:
                    buffer.copy_(source_buffers[name])
                dist.broadcast(buffer, src=0)

    def reshard(self, model: nn.Module) -> None:
        """FSDP2: put every unit back in its sharded state. Needed after forwards under torch.no_grad() that come
        before the first training step (preference tuning's reference pass and held-out metrics): without it,
        the root unit stays unsharded from them, so `model.parameters()` gives the unsharded tensors (an
        optimizer built then holds the wrong ones: its state dict cannot be saved) and the first backward's
        gradients come out wrong (measured: the step-1 gradients of 2 ranks differed from 1 rank's by ~50%)."""
        if not (self.enabled and self.strategy == "fsdp"):
            return
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The module whose state-dict keys are the model's own (DDP's `.module`; FSDP2 keeps the tree)."""
        return model.module if self.strategy == "ddp" and self.enabled else model

    def accumulation_context(self, model: nn.Module, last_micro_batch: bool):
        """DDP: skip the gradient all-reduce on a step's earlier micro-batches (they accumulate locally)."""
        if self.enabled and self.strategy == "ddp" and not last_micro_batch:
            return model.no_sync()
        return nullcontext()

    def full_model_state(self, model: nn.Module, trainable_only: bool = False) -> dict | None:
        """The whole model's state dict on rank 0 (CPU tensors), None elsewhere. A collective under fsdp.
        trainable_only (LoRA): leave the frozen base weights out: a LoRA checkpoint saves the adapters alone,
        and gathering a frozen 70B base to rank 0's memory at every checkpoint would be for nothing."""
        if self.enabled and self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
            state = get_model_state_dict(model, options=options)
            if not self.is_main:
                return None
            # Tied weights (lm_head = embeddings) come back as separate copies; save_pretrained only drops
            # aliases it can see as shared storage, so drop every alias but the first name here.
            first = {id(p): name for name, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
            aliases = {name for name, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != name}
            return {name: tensor for name, tensor in state.items() if name not in aliases}
        return None  # replicated: the module's own state_dict() is the whole state

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """AdamW's state keyed by parameter name (layout-independent: resumable under any strategy and world
        size). Complete on rank 0; a collective under fsdp."""
        if self.enabled and self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(
                model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        names = _optimizer_param_names(self.unwrap(model), optimizer)
        raw = optimizer.state_dict()
        return {
            "state": {names[index]: state for index, state in raw["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in raw["param_groups"]],
        }

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Inverse of `optimizer_state` (every rank passes the whole state)."""
        if self.enabled and self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
            return
        index = {name: i for i, name in enumerate(_optimizer_param_names(self.unwrap(model), optimizer))}
        unknown = [name for name in state["state"] if name not in index]
        if unknown:
            raise DistributedError(f"the checkpoint's optimizer state names parameters this model lacks: {unknown[:5]}")
        # The per-parameter state by name; the groups (and their hyperparameters) are this optimizer's own.
        current = optimizer.state_dict()
        optimizer.load_state_dict(
            {"state": {index[name]: s for name, s in state["state"].items()}, "param_groups": current["param_groups"]}
        )


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its state-dict index order (group after group)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class is in the HF model's `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global gradient norm (over every rank's shards) and clip to `max_norm` (None: only measure).

    FSDP2 gradients are DTensors: their norm is reduced across ranks before clipping, so every rank sees the
    same norm and takes the same skip decision in the NaN guard."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def fingerprint(*arrays) -> str:
    """A short content hash of numpy arrays (e.g. the tokenized dataset), to compare across ranks."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(memoryview(array).cast("B") if array.flags.c_contiguous else array.tobytes())
    return digest.hexdigest()[:16]
