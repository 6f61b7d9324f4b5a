"""ImageTextCrossAttention: text tokens attend to image tokens under a per-token media mask, on
``vlm_kernels.image_text_attention`` (work only on the images a token may see).

    hidden_states [B, L, D], media_mask [B, L, M] bool, image_states [B, M * media_len, Dv]
        -> [B, L, D]

Parameter names follow Hugging Face ``MllamaTextCrossAttention`` (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, per-head RMSNorm ``q_norm`` / ``k_norm``), so its state dict loads as it is. GQA when
``num_key_value_heads < num_heads``. For decoding, ``compute_image_kv`` runs the key/value projections of
the images once; pass the returned ``(k, v)`` in place of ``image_states`` on every later step.
Build ``media_mask`` with ``vlm_kernels.masks`` (e.g. ``from_image_token_ids``, the Mllama rule).
A model with several cross-attention layers builds one ``vk.MediaSchedule`` of the mask per forward and
passes it to every layer in place of the mask (``ImageTextCrossAttention.schedule``), so the chunk
schedules are built once, not once per layer.
"""

from __future__ import annotations

import torch
from torch import nn

import vlm_kernels as vk
from vlm_kernels.nn._autocast import autocast_dtype, cast
from vlm_kernels.nn.rms_norm import RMSNorm


class ImageTextCrossAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_key_value_heads: int | None = None,
        *,
        head_dim: int | None = None,
        kv_input_size: int | None = None,
        qk_norm: bool = True,
        norm_eps: float = 1e-5,
        bias: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        num_key_value_heads = num_key_value_heads or num_heads
        if num_heads % num_key_value_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_key_value_heads={num_key_value_heads}"
            )
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.backend = backend
        kv_input_size = kv_input_size or hidden_size
        q_size, kv_size = num_heads * self.head_dim, num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, q_size, bias=bias)
        self.k_proj = nn.Linear(kv_input_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(kv_input_size, kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    def compute_image_kv(self, image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_states [B, Lk, Dv] -> (k, v), each [B, Lk, Hkv, Dh] (k after ``k_norm``)."""
        if image_states.dim() != 3:
            raise ValueError(f"image_states must be [B, Lk, Dv], got {tuple(image_states.shape)}")
        shape = (*image_states.shape[:2], self.num_key_value_heads, self.head_dim)
        k = self.k_proj(image_states).view(shape)
        v = self.v_proj(image_states).view(shape)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    @staticmethod
    def schedule(
        media_mask: torch.Tensor | vk.MediaSchedule,
        num_image_tokens: int,
        media_len: int | None = None,
        empty_rows: str | None = None,
    ) -> vk.MediaSchedule:
        """The ``vk.MediaSchedule`` of ``media_mask [B, L, M]`` for ``num_image_tokens`` (Lk) image
        tokens: build it once per forward and pass it to every layer in place of the mask.
        ``media_len`` defaults to ``Lk // M``, ``empty_rows`` to "zero". A schedule passed in is
        returned as it is (after checking that ``media_len`` and ``empty_rows`` agree with it)."""
        if isinstance(media_mask, vk.MediaSchedule):
            for name, given, held in (
                ("media_len", media_len, media_mask.media_len),
                ("empty_rows", empty_rows, media_mask.empty_rows),
            ):
                if given is not None and given != held:
                    raise ValueError(
                        f"{name}={given!r} disagrees with the MediaSchedule's {held!r}"
                    )
            return media_mask
        if media_len is None:
            num_chunks = media_mask.shape[-1]
            if num_chunks == 0 or num_image_tokens % num_chunks:
                raise ValueError(
                    f"cannot infer media_len: {num_image_tokens} image tokens for media_mask "
                    f"{tuple(media_mask.shape)} with M={num_chunks} chunks; pass media_len"
                )
            media_len = num_image_tokens // num_chunks
        return vk.MediaSchedule(
            media_mask, media_len=media_len, empty_rows="zero" if empty_rows is None else empty_rows
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        media_mask: torch.Tensor | vk.MediaSchedule,
        image_states: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        media_len: int | None = None,
        empty_rows: str | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, L, D], media_mask [B, L, M] bool (or its ``vk.MediaSchedule``, shared
        by the layers of one forward), image_states [B, M * media_len, Dv] or the ``(k, v)`` of
        ``compute_image_kv`` -> [B, L, D]. ``media_len`` defaults to ``Lk // M`` (with a schedule:
        the schedule's; if given, it must agree).

        ``empty_rows="zero"`` (the default with a mask): tokens that see no image get 0 from the
        attention (Meta, torchtune); ``"uniform"``: they attend to every image token (Hugging Face
        Mllama). With a schedule: the schedule's (if given, it must agree)."""
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [B, L, D], got {tuple(hidden_states.shape)}")
        batch, length, _ = hidden_states.shape
        k, v = (
            image_states if isinstance(image_states, tuple) else self.compute_image_kv(image_states)
        )
        schedule = self.schedule(media_mask, k.shape[1], media_len, empty_rows)
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        dtype = autocast_dtype(q.device)
        out = vk.image_text_attention(
            cast(q, dtype),
            cast(k, dtype),
            cast(v, dtype),
            schedule,
            backend=self.backend,
        )  # (B, L, Hq, Dh)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))
