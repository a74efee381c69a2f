"""Opt-in ``torch.compile`` for training (``train.compile: true``) and sampling (``difflab sample --compile``).

``torch.compile`` is lazy: it fails, if it fails, on the first call (no C++ compiler for the CPU backend, an
unsupported Python or platform, an operator the compiler cannot trace). :class:`CompiledModule` therefore
tries the compiled forward and, on the first failure, warns in one line naming the cause and runs the module
eagerly from then on — the same weights, so a run never stops because compilation is unavailable. The eager
module is a registered submodule, so parameters, ``state_dict`` and ``train()/eval()`` are the original's.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class CompiledModule(nn.Module):
    """``module`` run through ``torch.compile``, falling back to eager with one warning if compiling fails."""

    def __init__(self, module: nn.Module, what: str = "the network", **options):
        super().__init__()
        self.module = module
        self.what = what
        self.failure = None
        object.__setattr__(self, "_compiled", None)  # not a submodule: its parameters are ``module``'s
        if not hasattr(torch, "compile"):
            self._fall_back("this torch has no torch.compile")
        else:
            try:
                object.__setattr__(self, "_compiled", torch.compile(module, **options))
            except Exception as err:  # noqa: BLE001 - whatever stops the compiler, eager still works
                self._fall_back(err)

    def _fall_back(self, err) -> None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        self.failure = f"{type(err).__name__ if isinstance(err, Exception) else 'unavailable'}: {first[:200]}"
        object.__setattr__(self, "_compiled", None)
        warnings.warn(f"torch.compile is unavailable for {self.what} ({self.failure}); running it uncompiled",
                      RuntimeWarning, stacklevel=3)

    @property
    def compiled(self) -> bool:
        """Whether calls go through the compiled module (False once it has fallen back)."""
        return self._compiled is not None

    def forward(self, *args, **kwargs):
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported, RuntimeError,
                    OSError, ImportError) as err:
                if isinstance(err, RuntimeError) and not _is_compiler_error(err):
                    raise
                self._fall_back(err)
        return self.module(*args, **kwargs)


def _is_compiler_error(err: RuntimeError) -> bool:
    """A RuntimeError raised by the compiler stack (inductor, dynamo, a C++ build), not by the model itself."""
    text = f"{type(err).__module__} {err}".lower()
    return any(word in text for word in ("dynamo", "inductor", "compile", "c++", "triton", "cpp"))


def maybe_compile(module: nn.Module, enabled: bool, what: str = "the network") -> nn.Module:
    """``CompiledModule(module)`` when ``enabled``, else ``module`` itself."""
    return CompiledModule(module, what) if enabled else module
