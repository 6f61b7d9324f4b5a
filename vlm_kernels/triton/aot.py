"""What each Triton kernel module asks the GPU compile report to build ahead of time.

A kernel module declares, at its bottom, the jit function, the types of its non-constexpr arguments
and the configs it runs with (for an autotuned kernel: every autotune config)::

    register_aot(
        _my_kernel,  # the @triton.jit function, or its @triton.autotune wrapper
        signature={"x_ptr": "*bf16:16", "n": "i32", "stride_x": "i64", "stride_y": 1},
        configs=_autotune_configs(),  # triton.Config / AOTConfig / dict; None: the autotuner's
    )

Signature values follow ``triton.tools.compile``: a type (``"*fp32"``, ``"*bf16"``, ``"*u8"``,
``"i32"``, ``"i64"``, ``"fp32"``...) with an optional ``":16"`` divisibility hint (what the JIT sees
for a 16-byte aligned pointer or an int that is a multiple of 16), or a number: the argument is
compiled as that constant (the JIT specializes an int argument equal to 1 that way: a unit stride).

To compile one kernel under several fixed constexprs (head dims, dtypes), register it once per
variant with ``name=`` and ``constexprs=``. ``python -m vlm_kernels.tools.gpu_report`` imports every
module of ``vlm_kernels.triton`` and compiles every (kernel, config) for sm_80 and sm_90.

This module imports nothing heavy: the registry is plain data.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AOTConfig:
    """One compile: the constexpr arguments' values and the launch options Triton compiles for."""

    constexprs: Mapping[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None

    @property
    def label(self) -> str:
        """``"BLOCK_M=64,BLOCK_N=32,w4,s3"``: names the config in the report and its log files."""
        parts = [f"{name}={value}" for name, value in self.constexprs.items()]
        parts += [f"w{self.num_warps}", f"s{self.num_stages}"]
        if self.maxnreg is not None:
            parts.append(f"r{self.maxnreg}")
        return ",".join(parts)

    def options(self) -> dict[str, Any]:
        """The ``options`` argument of ``triton.compile``."""
        opts: dict[str, Any] = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


@dataclass(frozen=True)
class AOTKernel:
    """A registered kernel. ``fn`` is the ``@triton.jit`` function: a ``JITFunction``, or an
    ``InterpretedFunction`` when ``module`` was imported under ``TRITON_INTERPRET=1`` (the report
    compiles in worker processes that import ``module`` with the interpreter off)."""

    name: str
    fn: Any
    module: str
    signature: Mapping[str, str | int | float]
    configs: tuple[AOTConfig, ...]

    def compile_args(
        self, config: AOTConfig
    ) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list]]:
        """``(signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` of one config."""
        signature: dict[str, str] = {}
        constexprs: dict[str, Any] = {}
        attrs: dict[tuple[int], list] = {}
        for index, (arg, param) in enumerate(inspect.signature(self.fn.fn).parameters.items()):
            if arg in config.constexprs:
                signature[arg], constexprs[arg] = "constexpr", config.constexprs[arg]
                continue
            if _is_constexpr(param):  # not in the config: its default (checked at registration)
                signature[arg], constexprs[arg] = "constexpr", param.default
                continue
            spec = self.signature[arg]
            if not isinstance(spec, str):
                signature[arg], constexprs[arg] = "constexpr", spec
                continue
            type_name, _, hint = spec.partition(":")
            signature[arg] = type_name
            if hint:
                attrs[(index,)] = [["tt.divisibility", int(hint)]]
        return signature, constexprs, attrs


class AOTRegistry:
    """Kernels by name. ``REGISTRY`` is the one the kernel modules fill and the report reads."""

    def __init__(self) -> None:
        self._kernels: dict[str, AOTKernel] = {}

    def add(self, kernel: AOTKernel) -> None:
        previous = self._kernels.get(kernel.name)
        if previous is not None and previous.module != kernel.module:
            raise ValueError(
                f"register_aot: kernel name {kernel.name!r} is registered by both "
                f"{previous.module} and {kernel.module}; pass name= to tell them apart"
            )
        self._kernels[kernel.name] = (
            kernel  # a module imported twice (reload) replaces its own entry
        )

    def get(self, name: str) -> AOTKernel:
        try:
            return self._kernels[name]
        except KeyError:
            raise KeyError(
                f"no AOT kernel named {name!r}; registered: {sorted(self._kernels)}"
            ) from None

    def remove(self, name: str) -> None:
        self._kernels.pop(name, None)

    def from_modules(self, modules: Iterable[str]) -> list[AOTKernel]:
        wanted = set(modules)
        return [kernel for kernel in self._kernels.values() if kernel.module in wanted]

    def __iter__(self) -> Iterator[AOTKernel]:
        return iter(list(self._kernels.values()))

    def __len__(self) -> int:
        return len(self._kernels)

    def __contains__(self, name: object) -> bool:
        return name in self._kernels


REGISTRY = AOTRegistry()


def _to_config(config: Any, shared_constexprs: Mapping[str, Any]) -> AOTConfig:
    if isinstance(config, AOTConfig):
        return AOTConfig(
            {**shared_constexprs, **config.constexprs},
            config.num_warps,
            config.num_stages,
            config.maxnreg,
        )
    if isinstance(config, Mapping):
        values = dict(config)
        options = {
            key: values.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in values
        }
        return AOTConfig({**shared_constexprs, **values}, **options)
    if hasattr(config, "kwargs") and hasattr(config, "num_warps"):  # triton.Config
        return AOTConfig(
            {**shared_constexprs, **config.kwargs},
            config.num_warps,
            config.num_stages,
            getattr(config, "maxnreg", None),
        )
    raise TypeError(
        f"register_aot: a config must be a triton.Config, AOTConfig or dict, got {config!r}"
    )


def register_aot(
    kernel: Any,
    *,
    signature: Mapping[str, str | int | float],
    configs: Iterable[Any] | None = None,
    constexprs: Mapping[str, Any] | None = None,
    name: str | None = None,
    registry: AOTRegistry | None = None,
) -> AOTKernel:
    """Declare ``kernel`` for ahead-of-time compilation; see the module docstring.

    kernel: a ``@triton.jit`` function, or an ``@triton.autotune`` / ``@triton.heuristics`` wrapper.
    signature: type (or constant) of every argument that is not a ``tl.constexpr``.
    configs: ``triton.Config`` / ``AOTConfig`` / dict (constexpr values plus optional ``num_warps``,
        ``num_stages``, ``maxnreg``); default: the autotuner's configs, else one config of defaults.
    constexprs: constexpr values shared by every config (a variant of the kernel).
    name: the kernel's name in the report (default: the function's name); unique per registry.
    """
    fn = kernel
    autotune_configs = None
    while not inspect.isfunction(
        getattr(fn, "fn", None)
    ):  # Autotuner / Heuristics: .fn is the jit fn
        if not hasattr(fn, "fn"):
            raise TypeError(f"register_aot: expected a @triton.jit function, got {kernel!r}")
        autotune_configs = autotune_configs or getattr(fn, "configs", None)
        fn = fn.fn
    if configs is None:
        configs = autotune_configs or [AOTConfig()]
    shared = dict(constexprs or {})
    aot_configs = tuple(_to_config(config, shared) for config in configs)
    entry = AOTKernel(
        name=name or fn.fn.__name__,
        fn=fn,
        module=sys._getframe(1).f_globals.get("__name__", fn.fn.__module__),
        signature=dict(signature),
        configs=aot_configs,
    )
    _validate(entry)
    (REGISTRY if registry is None else registry).add(entry)
    return entry


def _validate(kernel: AOTKernel) -> None:
    params = inspect.signature(kernel.fn.fn).parameters
    unknown = set(kernel.signature) - set(params)
    if unknown:
        raise ValueError(
            f"register_aot({kernel.name}): signature names unknown arguments {sorted(unknown)}"
        )
    if not kernel.configs:
        raise ValueError(f"register_aot({kernel.name}): no configs")
    for config in kernel.configs:
        for arg, param in params.items():
            is_constexpr = _is_constexpr(param)
            if is_constexpr and arg not in config.constexprs:
                if param.default is inspect.Parameter.empty:
                    raise ValueError(
                        f"register_aot({kernel.name}): config {config.label} gives no value "
                        f"for the constexpr argument {arg!r}"
                    )
            elif not is_constexpr and arg not in kernel.signature and arg not in config.constexprs:
                raise ValueError(
                    f"register_aot({kernel.name}): signature gives no type for argument {arg!r}"
                )


def _is_constexpr(param: inspect.Parameter) -> bool:
    # the annotation is tl.constexpr, or the string "tl.constexpr" under `from __future__ import
    # annotations`
    return "constexpr" in str(param.annotation)


def kernel_modules(package: str = "vlm_kernels.triton") -> list[str]:
    """Names of the modules of ``package`` (not imported; this registry module left out)."""
    module = importlib.import_module(package)
    return sorted(
        f"{package}.{info.name}"
        for info in pkgutil.iter_modules(module.__path__)
        if info.name != __name__.rpartition(".")[2]
    )
