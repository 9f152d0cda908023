"""How fastsft binds its forwards onto a model's modules, and takes them off again.

Below patcher.py (which decides what to bind) and the forwards themselves (attention.py, loss.py call the
original forward they replace): a module of mechanism only, so the import graph has no cycle
(see ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field

from torch import nn


def original_forward(module: nn.Module):
    """The forward the module had before fastsft bound its own (its class's, or an earlier instance one)."""
    previous = module.__dict__.get("_fastsft_previous_forward")
    return previous if previous is not None else types.MethodType(type(module).forward, module)


class PatchedForward:
    """A module's per-instance `forward`: calls `function(module, ...)`. It shows the original forward's
    signature (HF Trainer reads it to choose which dataset columns to keep) and, unlike a bound method of a
    module-level function, survives pickle and deepcopy (its state is plain data)."""

    def __init__(self, function, module: nn.Module):
        self.function = function
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(original_forward(self.module))


@dataclass
class Undo:
    """Everything needed to put the model back exactly as it was."""

    forwards: list[tuple[nn.Module, list[str]]] = field(default_factory=list)  # (module, attributes we set)
    configs: list[tuple[nn.Module, object]] = field(default_factory=list)  # (module, its original config)
    attributes: list[tuple[nn.Module, list[str]]] = field(default_factory=list)  # (module, state set alone)

    def bind(self, module: nn.Module, function, **state) -> None:
        """Bind `function` as module.forward (keeping an existing instance forward to call and restore) and
        set the module's fastsft state attributes."""
        names = list(state)
        previous = module.__dict__.get("forward")
        if previous is not None:
            module.__dict__["_fastsft_previous_forward"] = previous
            names.append("_fastsft_previous_forward")
        for name, value in state.items():
            module.__dict__[name] = value
        module.__dict__["forward"] = PatchedForward(function, module)
        self.forwards.append((module, names))

    def set_state(self, module: nn.Module, **state) -> None:
        """Set fastsft state attributes on a module whose forward is bound already (or stays its own)."""
        for name, value in state.items():
            module.__dict__[name] = value
        self.attributes.append((module, list(state)))

    def undo(self) -> None:
        for module, names in reversed(self.attributes):
            for name in names:
                module.__dict__.pop(name, None)
        for module, names in reversed(self.forwards):
            previous = module.__dict__.get("_fastsft_previous_forward")
            module.__dict__.pop("forward", None)
            if previous is not None:
                module.__dict__["forward"] = previous
            for name in names:
                module.__dict__.pop(name, None)
        for module, config in reversed(self.configs):
            module.config = config


def base_decoder(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """(attribute name, module) of a causal LM's base decoder (the module its forward calls: `model.model` for
    Llama-likes), or (None, None). Llama-4's text model names "language_model" as its prefix (the multimodal
    model's name) and keeps its decoder at `model`."""
    for name in dict.fromkeys((getattr(model, "base_model_prefix", "model"), "model")):
        base = model._modules.get(name) if name else None
        if isinstance(base, nn.Module) and base is not model:
            return name, base
    return None, None
