"""The registry: ops, their named shapes, and the providers (ours per backend, then the peers).

Ours: one provider `vk-<backend>` per backend in `vlm_kernels.op_backends(op)` that
`vlm_kernels.available_backends()` reports available and that runs on the benchmark device, so
kernels added by later work show up here without touching the harness. Emulated backends (`cuda_sim`, and
`triton` on the CPU under TRITON_INTERPRET=1) are opt-in: they run only when named in --providers.
"""

from __future__ import annotations

import functools
import os

import torch

from benchmarks.ops import concat_project, image_text_attention, patch_embed, perceiver_attention
from benchmarks.spec import OpSpec, Provider, Shape

OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        image_text_attention.SPEC,
        patch_embed.SPEC,
        concat_project.SPEC,
        perceiver_attention.SPEC,
    )
}

# Device types each backend runs on; a backend not listed here is tried on any device.
_BACKEND_DEVICES = {
    "reference": ("cpu", "cuda"),
    "cpu": ("cpu",),
    "triton": ("cuda",),
    "cuda": ("cuda",),
    "cuda_sim": ("cpu",),
}
_EMULATED = {"cuda_sim"}


def get_op(name: str) -> OpSpec:
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; expected one of {sorted(OPS)}")
    return OPS[name]


def get_shape(op: str, name: str) -> Shape:
    shapes = get_op(op).shapes
    if name not in shapes:
        raise KeyError(f"op {op} has no shape {name!r}; expected one of {sorted(shapes)}")
    return shapes[name]


def all_shapes() -> list[Shape]:
    return [shape for spec in OPS.values() for shape in spec.shapes.values()]


@functools.cache
def _vlm_kernels():
    """(module, None) or (None, why the import failed)."""
    try:
        import vlm_kernels
    except Exception as exc:
        return None, f"import vlm_kernels failed: {type(exc).__name__}: {exc}"
    return vlm_kernels, None


def _backends_of(op: str) -> list[str]:
    vk, _ = _vlm_kernels()
    if vk is None or not hasattr(vk, "op_backends"):
        return ["reference"]
    return list(vk.op_backends(op))


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _ours_unavailable(backend: str, device: torch.device) -> str | None:
    vk, reason = _vlm_kernels()
    if vk is None:
        return reason
    available = vk.available_backends()
    if not available.get(backend, False):
        why = available.get("reasons", {}).get(backend, "")
        return f"backend {backend} not available" + (f": {why}" if why else "")
    devices = _BACKEND_DEVICES.get(backend, (device.type,))
    if backend == "triton" and device.type == "cpu" and _interpreting_triton():
        return None
    if device.type not in devices:
        return f"backend {backend} does not run on {device.type} tensors"
    return None


def _ours_opt_in(backend: str, device: torch.device) -> bool:
    return backend in _EMULATED or (backend == "triton" and device.type == "cpu")


def _ours(op: OpSpec, backend: str) -> Provider:
    def prepare(inputs):
        return lambda: op.call_ours(inputs, backend)

    return Provider(
        name=f"vk-{backend}",
        op=op.name,
        kind="ours",
        description=f"vlm_kernels.{op.name}(..., backend={backend!r})",
        prepare=prepare,
        unavailable=functools.partial(_ours_unavailable, backend),
        opt_in=functools.partial(_ours_opt_in, backend),
    )


def providers(op: str) -> list[Provider]:
    """Every provider of `op`: ours (one per backend with a kernel for it), then the peers."""
    spec = get_op(op)
    ours = [_ours(spec, backend) for backend in _backends_of(op)]
    peers = [
        Provider(
            name=peer.name,
            op=op,
            kind="ceiling" if peer.ceiling else "peer",
            description=peer.description,
            prepare=peer.prepare,
            unavailable=lambda device: None,
        )
        for peer in spec.peers
    ]
    return ours + peers


def get_provider(op: str, name: str) -> Provider:
    for provider in providers(op):
        if provider.name == name:
            return provider
    raise KeyError(
        f"op {op} has no provider {name!r}; expected one of {[p.name for p in providers(op)]}"
    )
