"""The launcher every Triton kernel of the package goes through, and the switch that forces one of its
autotune configs.

A kernel module declares, at import, the config lists each kernel is launched with
(``declare_configs``) and launches through ``launch``:

- on a GPU, autotuned over the list (a one-config list is not benchmarked);
- under ``TRITON_INTERPRET=1``, on the list's first config only (the autotuner would benchmark every
  config in numpy there);
- inside ``force_triton_config(name, index)``, on ``configs[min(index, len(configs) - 1)]`` of the
  list it is given, bypassing the autotuner on the GPU too. Tests (interpreter) and
  ``python -m vlm_kernels.tools.gpu_check`` (GPU) walk ``range(triton_config_counts()[name])`` so that
  every config of every list runs against the reference, not only the one the autotuner picks.

Tuning policy: a kernel is tuned once per *bucket*, not per shape. The autotuner's key is the
launcher's ``tune_key`` (argument names) with every integer value rounded up to a power of two, plus
the tensor arguments' dtypes, so a new image count M or decode length does not re-tune (M = 1..8 is
four buckets: 1, 2, 4, 8). A launch given a one-config list (a launcher that picks its config by a
heuristic, e.g. the split-KV decode kernels) runs it directly, with no autotuner at all. Each tuning
pass the GPU would run is counted (``tuning_passes()``), under the interpreter too, where nothing is
benchmarked: tests bound the count.

Kernel names are those of the compile report's families (``"image_text_attention_fwd"``,
``"block_chunk_schedule"``...), one per ``@triton.jit`` function.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence

import triton
from triton.runtime.interpreter import InterpretedFunction

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])

_declared: dict[str, int] = {}  # kernel name -> longest declared config list
_tuning_keys: dict[
    str, set
] = {}  # kernel name -> the (configs, bucket key) it was (or would be) tuned at
_forced: dict[str, int] = {}  # kernel name -> forced index, while a force_triton_config is active
_lock = threading.Lock()


def declare_configs(name: str, *config_lists: Sequence[triton.Config]) -> None:
    """Kernel ``name`` is launched with one of ``config_lists`` (e.g. one per input dtype)."""
    longest = max((len(configs) for configs in config_lists), default=0)
    if longest == 0:
        raise ValueError(f"declare_configs({name!r}): no configs")
    _declared[name] = max(_declared.get(name, 0), longest)


def _import_kernel_modules() -> None:
    from vlm_kernels.triton.aot import kernel_modules

    for module in kernel_modules():
        importlib.import_module(module)


def triton_config_counts() -> dict[str, int]:
    """Kernel name -> the length of the longest config list it is launched with (every kernel module
    of ``vlm_kernels.triton`` is imported first, so the answer covers them all)."""
    _import_kernel_modules()
    return dict(sorted(_declared.items()))


@contextlib.contextmanager
def force_triton_config(kernel_name: str, index: int) -> Iterator[None]:
    """While active, every launch of ``kernel_name`` runs ``configs[min(index, len(configs) - 1)]``
    of the list it is launched with, on the GPU too (no autotuning). Nests; process-wide."""
    if kernel_name not in _declared:
        _import_kernel_modules()
    if kernel_name not in _declared:
        raise ValueError(
            f"force_triton_config: unknown kernel {kernel_name!r}; known: {sorted(_declared)}"
        )
    if index < 0:
        raise ValueError(f"force_triton_config: index must be >= 0, got {index}")
    with _lock:
        previous = _forced.get(kernel_name)
        _forced[kernel_name] = index
    try:
        yield
    finally:
        with _lock:
            if previous is None:
                _forced.pop(kernel_name, None)
            else:
                _forced[kernel_name] = previous


def forced_config(name: str, configs: Sequence[triton.Config]) -> triton.Config | None:
    """The config a ``force_triton_config`` on ``name`` selects from ``configs``, else None. For a
    launcher that derives host-side values (a schedule's block size) from the config it will run."""
    index = _forced.get(name)
    return None if index is None else configs[min(index, len(configs) - 1)]


def interpreting(kernel) -> bool:
    """``kernel`` (a ``@triton.jit`` function) runs in Triton's interpreter: TRITON_INTERPRET=1 was
    set when its module was imported."""
    return isinstance(kernel, InterpretedFunction)


def tune_bucket(value):
    """The autotune key of one argument value: an int rounded up to a power of two (0 and 1 stay),
    anything else (a dtype name, a precision string) as it is."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 1:
        return value
    return 1 << (value - 1).bit_length()


@functools.cache
def _param_names(kernel) -> tuple[str, ...]:
    return tuple(inspect.signature(kernel.fn).parameters)


def tuning_key(kernel, args: Sequence, constexprs: dict, tune_key: Sequence[str]) -> tuple:
    """The bucketed key a launch of ``kernel(*args, **constexprs)`` is tuned at (see the module
    docstring): ``(name, bucket)`` per ``tune_key`` name, then the dtypes of the tensor arguments."""
    values = dict(zip(_param_names(kernel), args, strict=False)) | constexprs
    key = tuple((name, tune_bucket(values[name])) for name in tune_key)
    return key + tuple(str(arg.dtype) for arg in args if hasattr(arg, "dtype"))


def tuning_passes() -> dict[str, int]:
    """Kernel name -> how many tuning passes its launches so far ran (on a GPU) or would have run
    (under the interpreter, which benchmarks nothing): one per distinct config list and bucket key."""
    return {name: len(keys) for name, keys in sorted(_tuning_keys.items())}


def reset_tuning_passes() -> None:
    """Forgets the counted tuning keys (tests); the GPU autotuners keep their tuned configs."""
    _tuning_keys.clear()


@functools.cache
def _autotuner(kernel, configs: tuple[triton.Config, ...], key: tuple):
    """One autotuner per (kernel, config list, bucket key): it benchmarks on its first launch and
    serves every later launch of the bucket. Its own key is empty: the bucket is the key."""
    del key  # part of the cache key only
    return triton.autotune(configs=list(configs), key=[])(kernel)


def launch(
    name: str,
    kernel,
    configs: Sequence[triton.Config],
    grid: Callable[[dict], tuple[int, ...]],
    args: Sequence,
    *,
    tune_key: Sequence[str],
    tune_configs: Sequence[triton.Config] | None = None,
    **constexprs,
) -> None:
    """Runs ``kernel[grid](*args, **constexprs)`` at a config of ``configs``: the forced one, else
    the first (interpreter) or the autotuner's pick among ``tune_configs`` (default ``configs``;
    a launcher whose host-side setup fixes part of the config narrows the list this way, while a
    forced index still counts in the whole ``configs``; a one-config ``tune_configs`` is a heuristic's
    pick and runs without an autotuner). ``tune_key``: the argument names whose bucketed values key
    the tuning (``tuning_key``). ``grid(meta)`` sees the running config's constexprs (under the
    autotuner: Triton's bound arguments, the same names)."""
    declared = _declared.get(name)
    if declared is None or len(configs) > declared:
        raise RuntimeError(f"launch({name!r}): configs not declared with declare_configs")
    tune_configs = tuple(tune_configs or configs)
    config = forced_config(name, configs)
    if config is None and len(tune_configs) == 1:
        config = tune_configs[0]  # a heuristic's pick (or a one-config list): no autotuner
    key = None
    if config is None:
        key = tuning_key(kernel, args, constexprs, tune_key)
        _tuning_keys.setdefault(name, set()).add((tuple(map(str, tune_configs)), key))
    if interpreting(kernel):
        _patch_interpreter_scalar_index()
        meta = {**constexprs, **(config or tune_configs[0]).kwargs}
        kernel[grid(meta)](*args, **meta)
    elif config is not None:
        meta = {**constexprs, **config.kwargs}
        # all_kwargs(): the constexprs plus num_warps/num_stages/... as the autotuner passes them.
        kernel[grid(meta)](*args, **constexprs, **config.all_kwargs())
    else:
        _autotuner(kernel, tune_configs, key)[grid](*args, **constexprs)


# ---- interpreter compatibility --------------------------------------------------------------------

_INDEX_PATCH_FLAG = "_vlmk_scalar_index"


def _patch_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter (3.7 and 3.8 fixed it) turns a tensor used as a Python int (a
    ``range`` bound of a loop: ``range(0, chunk_count * tiles)``) into one with
    ``int(handle.data)``. A scalar derived from ``tl.program_id`` is a 1-element 1-D numpy array
    there, and NumPy 2.4 made ``int()`` of an array with ndim > 0 a TypeError ("only 0-dimensional
    arrays can be converted to Python scalars"; a DeprecationWarning since NumPy 1.25). Interpreter
    only: compiled kernels lower such a loop to ``scf.for`` with no Python conversion. The patch
    wraps the interpreter's tensor patching to read the one element instead (``.item()``; 3.8 does
    ``int(data.squeeze())``)."""
    if TRITON_VERSION >= (3, 7):
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, _INDEX_PATCH_FLAG, False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    setattr(patch_lang_tensor, _INDEX_PATCH_FLAG, True)
    interpreter._patch_lang_tensor = patch_lang_tensor
