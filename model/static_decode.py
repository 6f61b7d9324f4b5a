"""Graph-captured decode: one token's decode step over static buffers, captured once in a
``torch.cuda.CUDAGraph`` and replayed for every later token (``generate(..., cuda_graph=True)``).

A decode step of the text decoder is the whole forward for one token per row: self-attention through
the KV cache, every gated cross-attention block on the precomputed image keys/values under the step's
media schedule, the MLPs and the logits. At small batch each of its many small kernels costs less GPU
time than the Python and the launch that issue it; a graph replays them all with one launch.

What makes the step capturable (the graph records the kernels and their buffer addresses once):
- static inputs: the token [B, 1], its position [1] and the media mask [B, 1, M] live in buffers that
  every call copies into (a device copy and a scalar fill: no host-to-device transfer, no sync);
- the image keys/values are computed once per prompt and stay where they are;
- the self-attention reads the whole static KV cache with the positions after the token masked
  (``KVCache.write``, ``static_cache=True``), where the eager path slices the cache at a length it
  reads back from the device;
- the media schedule is built inside the step from the mask buffer with torch ops, and the Triton
  decode kernels pick their config by a heuristic (no autotuner, no host sync:
  tests/test_media_schedule.py checks both), so the graph rebuilds it on replay from whatever mask
  the buffer holds;
- sampling, the <eos> bookkeeping and the stop test (a host sync) stay outside, in ``generate``.

The media mask of a decoded token is the same at every step: generated tokens are never <image>
(generate bans it), so each of them sees the prompt's last image group (the Mllama rule of
``vk.masks.from_image_token_ids``). ``generate`` builds it once, after the first token.
"""

from __future__ import annotations

import torch

from model.text import ImageKV, TextDecoder

# Eager steps before the capture: the first compiles the Triton kernels and creates the cuBLAS
# handles and workspaces (none of which may happen inside a capture); a second on the side stream is
# what the torch.cuda.graphs documentation recommends before capturing.
WARMUP_STEPS = 2


class StaticDecodeStep:
    """One decode step of ``decoder`` over static buffers, run eagerly or through a CUDA graph.

    Args:
        decoder: the text decoder, its KV caches set up (``setup_caches``) and holding the prompt.
        image_kv: every cross-attention block's image (k, v), computed once per prompt; None for a
            text-only batch (the decoder then skips its cross-attention blocks).
        media_mask: [B, 1, M] bool, the media a decoded token sees (copied into the step's buffer);
            None with image_kv None.
        media_len: tokens per media item.
        token_dtype: dtype of the token buffer (that of the ids).
        cuda_graph: capture the step in a CUDA graph after ``warmup_steps`` eager steps and replay it
            from then on (CUDA tensors only); False runs ``step`` eagerly every time: the same
            computation, on any device (what the CPU tests check).

    Call it with the previous token [B] and its position; it returns the logits [B, V] (float32) of
    the next token. With a graph they are the graph's output buffer, overwritten by the next call.
    """

    def __init__(
        self,
        decoder: TextDecoder,
        image_kv: list[ImageKV] | None,
        media_mask: torch.Tensor | None,
        media_len: int,
        *,
        token_dtype: torch.dtype = torch.long,
        cuda_graph: bool,
        warmup_steps: int = WARMUP_STEPS,
    ):
        if (media_mask is None) != (image_kv is None):
            raise ValueError(
                "media_mask and image_kv go together: both None (text only) or both given"
            )
        if media_mask is not None and (
            media_mask.dim() != 3 or media_mask.shape[1] != 1 or media_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"media_mask must be [B, 1, M] bool (one decoded token per row), got "
                f"{tuple(media_mask.shape)} {media_mask.dtype}"
            )
        if cuda_graph and media_mask is not None and media_mask.device.type != "cuda":
            raise ValueError(
                f"a CUDA graph needs CUDA tensors; the media mask is on {media_mask.device}"
            )
        if any(layer.attention.kv_cache is None for layer in decoder.layers):
            raise RuntimeError("the decoder has no KV cache: call decoder.setup_caches first")
        cache = decoder.layers[0].attention.kv_cache.k_cache  # (B, Hkv, S, Dh)
        if cuda_graph and cache.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs CUDA tensors; the KV cache is on {cache.device}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 before a capture, got {warmup_steps}")
        batch, device = cache.shape[0], cache.device
        self.decoder = decoder
        self.image_kv = image_kv
        self.media_len = media_len
        self.token = torch.zeros(batch, 1, dtype=token_dtype, device=device)  # (B, 1)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.media_mask = None if media_mask is None else media_mask.clone()  # (B, 1, M)
        self.cuda_graph = cuda_graph
        self.warmup_steps = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None  # the graph's output buffer, (B, V)
        self.eager_steps = 0
        self.replays = 0

    def step(self) -> torch.Tensor:
        """The captured function: the decoder forward of the token in ``self.token`` at
        ``self.position``, which also writes its keys/values into the KV cache -> logits [B, V].
        Reads only the static buffers; no host sync, no Python branch on a tensor's value."""
        logits = self.decoder(
            self.token,
            self.media_mask,
            self.image_kv,
            self.media_len,
            self.position,
            static_cache=True,
        )  # (B, 1, V)
        return logits[:, -1]

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Decodes ``token`` [B] at ``position`` (int); returns the next token's logits [B, V]."""
        self.token.copy_(token.view(-1, 1))
        self.position.fill_(position)  # a scalar kernel argument: no host-to-device copy
        if not self.cuda_graph:
            self.eager_steps += 1
            return self.step()
        if self.graph is None:
            if self.eager_steps < self.warmup_steps:
                self.eager_steps += 1
                return self._step_on_side_stream()
            self._capture()
        self.graph.replay()
        self.replays += 1
        return self.graph_logits

    def _step_on_side_stream(self) -> torch.Tensor:
        """A warm-up step on a side stream, as torch.cuda.graphs recommends before a capture (the
        lazy initialisations then happen off the stream that will be captured)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.step()
        torch.cuda.current_stream().wait_stream(side)
        return logits

    def _capture(self) -> None:
        """Records ``step`` into a graph. Nothing runs during the capture (the KV cache is written
        on the replay that follows), so the capture itself decodes no token."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.graph_logits = self.step()
        self.graph = graph
