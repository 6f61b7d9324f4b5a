"""Fast tests of the benchmark harness (benchmarks/): registry shapes, peers vs the reference op,
the CLI end to end at the tiny shapes, exact FLOP counts and the timing/memory helpers."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import vlm_kernels as vk
from benchmarks import cli, registry, timing
from benchmarks.ops import concat_project, image_text_attention, patch_embed, perceiver_attention
from benchmarks.runner import make_step, select_providers
from benchmarks.spec import Inputs, ProviderUnavailable

CPU = torch.device("cpu")

# fp32 at the tiny shapes: peers and the reference sum the same <= 147 products in different orders
# (blocked GEMMs, online vs two-pass softmax), which differ by a few ulp (measured <= 1.5e-6 here);
# 1e-5 absolute + relative leaves a 5-10x margin.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


def _expected_shapes(op: str, p: dict, variant: str) -> dict[str, tuple]:
    if op == "image_text_attention":
        lk = p["M"] * p["media_len"]
        return {
            "q": (p["B"], p["Lq"], p["Hq"], p["Dh"]),
            "k": (p["B"], lk, p["Hkv"], p["Dh"]),
            "v": (p["B"], lk, p["Hkv"], p["Dh"]),
            "media_mask": (p["B"], p["Lq"], p["M"]),
        }
    if op == "patch_embed":
        n = (p["H"] // p["P"]) * (p["W"] // p["P"]) + 1
        shapes = {
            "pixels": (p["B"], p["C"], p["H"], p["W"]),
            "weight": (p["D"], p["C"], p["P"], p["P"]),
            "cls_token": (p["D"],),
            "pos_embed": (n, p["D"]),
        }
        if variant == "uint8":
            shapes.update(pixel_mean=(p["C"],), pixel_std=(p["C"],))
        return shapes
    if op == "concat_project":
        return {"weight": (p["N"], sum(p["dims"])), "bias": (p["N"],)}
    return {
        "q": (p["B"], p["Nl"], p["Hq"], p["Dh"]),
        "k_media": (p["B"], p["Nm"], p["Hkv"], p["Dh"]),
        "v_media": (p["B"], p["Nm"], p["Hkv"], p["Dh"]),
        "k_latents": (p["B"], p["Nl"], p["Hkv"], p["Dh"]),
        "v_latents": (p["B"], p["Nl"], p["Hkv"], p["Dh"]),
    }


@pytest.mark.parametrize("op", list(registry.OPS))
def test_tiny_inputs_have_the_api_shapes(op):
    shape = registry.get_shape(op, "tiny")
    for variant in shape.variants:
        inputs = shape.build(variant, torch.float32, CPU, seed=3, requires_grad=True)
        for name, expected in _expected_shapes(op, shape.params, variant).items():
            assert tuple(inputs.tensors[name].shape) == expected, (op, variant, name)
        assert inputs.grad_inputs and all(t.requires_grad and t.is_leaf for t in inputs.grad_inputs)
        for t in inputs.grad_inputs:
            assert t.dtype == torch.float32 and t.abs().sum() > 0  # never zeros
        again = shape.build(variant, torch.float32, CPU, seed=3)
        assert not again.grad_inputs
        for name, t in inputs.tensors.items():  # seeded: the same values again
            if isinstance(t, torch.Tensor):
                assert torch.equal(t.detach(), again.tensors[name]), (op, variant, name)
    if op == "concat_project":
        features = shape.build("default", torch.bfloat16, CPU).tensors["features"]
        assert [f.shape for f in features] == [
            (*shape.params["lead"], d) for d in shape.params["dims"]
        ]
        assert all(f.dtype == torch.bfloat16 for f in features)


def test_model_shapes_hold_the_published_numbers():
    ita = registry.get_shape("image_text_attention", "mllama-11b").params
    assert (ita["B"], ita["Lq"], ita["Hq"], ita["Hkv"], ita["Dh"]) == (1, 1024, 32, 8, 128)
    assert ita["M"] * ita["media_len"] == 4 * 1601
    decode = registry.get_shape("image_text_attention", "mllama-11b-decode")
    assert (decode.params["B"], decode.params["Lq"], decode.modes) == (8, 1, ("fwd",))
    mllama_vit = registry.get_shape("patch_embed", "mllama-11b").params
    assert (mllama_vit["H"] // mllama_vit["P"]) ** 2 + 1 == 1601 and mllama_vit["D"] == 1280
    clip = registry.get_shape("patch_embed", "clip-vit-l14-336").params
    assert (clip["H"] // clip["P"]) ** 2 + 1 == 577 and clip["D"] == 1024
    projector = registry.get_shape("concat_project", "mllama-11b").params
    assert (sum(projector["dims"]), projector["N"]) == (7680, 4096)
    llava = registry.get_shape("concat_project", "clip-vit-l14-336").params
    assert (llava["lead"][-1], llava["dims"], llava["N"]) == (576, (1024,), 4096)
    perceiver = registry.get_shape("perceiver_attention", "flamingo-perceiver").params
    # Issue 12: 16 media items of 4 frames x 257 tokens, 64 latents, 8 heads of 64.
    assert (perceiver["B"], perceiver["Nm"]) == (16, 4 * 257)
    assert (perceiver["Nl"], perceiver["Hq"], perceiver["Hkv"], perceiver["Dh"]) == (64, 8, 8, 64)
    # Shapes are lazy: a registry entry holds sizes only, no tensors.
    for shape in registry.all_shapes():
        assert not any(isinstance(v, torch.Tensor) for v in shape.params.values())


def test_media_mask_variants():
    gen = torch.Generator().manual_seed(0)
    one = image_text_attention.build_media_mask("1of4", 2, 12, 4, gen)
    assert one.shape == (2, 12, 4) and bool((one.sum(-1) == 1).all())
    assert one[0].float().argmax(-1).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert bool(image_text_attention.build_media_mask("all", 1, 5, 3, gen).all())
    causal = image_text_attention.build_media_mask("causal", 1, 8, 4, gen)[0]
    assert causal.sum(-1).tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    last = image_text_attention.build_media_mask("last", 3, 1, 4, gen)
    assert last.tolist() == [[[False, False, False, True]]] * 3
    random_a = image_text_attention.build_media_mask(
        "random", 2, 50, 4, torch.Generator().manual_seed(1)
    )
    random_b = image_text_attention.build_media_mask(
        "random", 2, 50, 4, torch.Generator().manual_seed(1)
    )
    assert torch.equal(random_a, random_b) and not bool(random_a.any(-1).all())  # has empty rows
    with pytest.raises(ValueError, match="unknown media mask variant"):
        image_text_attention.build_media_mask("2of4", 1, 4, 4, gen)


# Peers that match the spec only for some mask variants (they decline the rest, tested below).
PEER_VARIANTS = {("image_text_attention", "sdpa_nomask"): ("all",)}


def _peer_cases():
    for op, spec in registry.OPS.items():
        for peer in spec.peers:
            if peer.ceiling:  # not the op: test_ceiling_* below
                continue
            for variant in PEER_VARIANTS.get((op, peer.name), spec.shapes["tiny"].variants):
                yield pytest.param(op, peer.name, variant, id=f"{op}-{peer.name}-{variant}")


@pytest.mark.parametrize("variant", ["1of4", "causal", "random"])
def test_sdpa_without_mask_declines_masked_cases(variant):
    shape = registry.get_shape("image_text_attention", "tiny")
    inputs = shape.build(variant, torch.float32, CPU, seed=3, requires_grad=False)
    with pytest.raises(ProviderUnavailable, match="every token sees all"):
        image_text_attention.prepare_sdpa_nomask(inputs)


def _peer_prepare(op: str, name: str):
    if (op, name) == ("image_text_attention", "flex"):
        # Compiling FlexAttention takes ~30 s on 2 cores with a cold cache; its eager path runs the
        # same mask_mod and block mask (the compiled kernel itself is torch's to test).
        return lambda inputs: image_text_attention.prepare_flex(inputs, compile=False)
    return next(p for p in registry.get_op(op).peers if p.name == name).prepare


@pytest.mark.parametrize(("op", "peer", "variant"), list(_peer_cases()))
def test_peer_matches_reference(op, peer, variant):
    spec = registry.get_op(op)
    shape = spec.shapes["tiny"]
    # FlexAttention has no backward on CPU (torch 2.14): forward only there.
    with_grad = not (peer == "flex" and CPU.type == "cpu")
    inputs = shape.build(variant, torch.float32, CPU, seed=11, requires_grad=with_grad)
    expected = spec.call_ours(inputs, "reference")
    got = _peer_prepare(op, peer)(inputs)()
    torch.testing.assert_close(got, expected, **FP32_TOL)
    if not with_grad:
        return
    cotangent = torch.randn_like(expected)
    grads_expected = torch.autograd.grad(expected, inputs.grad_inputs, cotangent)
    grads_got = torch.autograd.grad(got, inputs.grad_inputs, cotangent)
    for i, (g, e) in enumerate(zip(grads_got, grads_expected, strict=True)):
        torch.testing.assert_close(g, e, **FP32_TOL, msg=lambda m, i=i: f"grad {i}: {m}")


def test_flex_without_backward_is_reported_unavailable():
    shape = registry.get_shape("image_text_attention", "tiny")
    inputs = shape.build("1of4", torch.float32, CPU, requires_grad=True)
    with pytest.raises(ProviderUnavailable, match="flex_attention failed"):
        image_text_attention.prepare_flex(inputs, compile=False)


def test_attention_flops_count_visible_pairs_exactly():
    media_mask = torch.tensor([[[True, False], [False, True], [True, True], [False, False]]])
    q = torch.randn(1, 4, 2, 8)
    k = torch.randn(1, 2 * 3, 1, 8)
    inputs = Inputs(dict(q=q, k=k, v=k, media_mask=media_mask), dict(media_len=3))
    pairs = 3 + 3 + 6 + 0  # keys seen by each of the 4 query rows
    assert image_text_attention.flops(inputs, "fwd") == 4 * 8 * 2 * pairs == 768
    assert image_text_attention.flops(inputs, "fwd_bwd") == 768 * 7 // 2 == 2688
    # Equal to the dense mask's count on a random mask.
    shape = registry.get_shape("image_text_attention", "tiny")
    tiny = shape.build("random", torch.float32, CPU)
    p = shape.params
    dense = tiny.tensors["media_mask"].repeat_interleave(p["media_len"], dim=-1)
    assert image_text_attention.flops(tiny, "fwd") == 4 * p["Dh"] * p["Hq"] * int(dense.sum())


def test_perceiver_flops_skip_padding():
    padding = torch.tensor([[True, True, True], [True, False, False]])
    t = dict(
        q=torch.randn(2, 4, 2, 8),
        k_media=torch.randn(2, 3, 2, 8),
        v_media=torch.randn(2, 3, 2, 8),
        k_latents=torch.randn(2, 4, 2, 8),
        v_latents=torch.randn(2, 4, 2, 8),
        media_padding_mask=padding,
    )
    pairs = 4 * (3 + 4) + 4 * (1 + 4)  # each latent: its item's real media tokens + all 4 latents
    assert perceiver_attention.flops(Inputs(t), "fwd") == 4 * 8 * 2 * pairs
    t["media_padding_mask"] = None
    assert perceiver_attention.flops(Inputs(t), "fwd") == 4 * 8 * 2 * (2 * 4 * (3 + 4))


def test_gemm_flops():
    pe = registry.get_shape("patch_embed", "mllama-11b").params
    pixels = torch.empty(pe["B"], pe["C"], pe["H"], pe["W"], device="meta")
    weight = torch.empty(pe["D"], pe["C"], pe["P"], pe["P"], device="meta")
    fwd = patch_embed.flops(Inputs(dict(pixels=pixels, weight=weight)), "fwd")
    assert fwd == 2 * 4 * 1600 * 1280 * 3 * 14 * 14
    assert patch_embed.flops(Inputs(dict(pixels=pixels, weight=weight)), "fwd_bwd") == 2 * fwd
    features = [torch.empty(4, 1601, 1280, device="meta")] * 6
    inputs = Inputs(dict(features=features, weight=torch.empty(4096, 7680, device="meta")))
    assert concat_project.flops(inputs, "fwd") == 2 * 4 * 1601 * 7680 * 4096
    assert concat_project.flops(inputs, "fwd_bwd") == 3 * 2 * 4 * 1601 * 7680 * 4096


def test_summarize_percentiles():
    stats = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median_ms, stats.p20_ms, stats.p80_ms) == (3.0, 1.8, 4.2)


def test_cpu_peak_memory_sees_a_touched_allocation():
    size = 64 * 2**20
    peak, method = timing.peak_memory(lambda: torch.ones(size, dtype=torch.uint8), CPU)
    assert "RSS" in method
    assert peak >= size * 3 // 4


def test_fwd_bwd_step_returns_output_and_runs_backward():
    shape = registry.get_shape("concat_project", "tiny")
    inputs = shape.build("default", torch.float32, CPU, requires_grad=True)
    cotangent: dict = {}
    step = make_step(
        registry.get_provider("concat_project", "cat_linear").prepare(inputs),
        inputs,
        "fwd_bwd",
        cotangent,
    )
    out = step()
    assert out.shape == (*shape.params["lead"], shape.params["N"])
    assert cotangent["value"].shape == out.shape  # fixed cotangent drawn once, reused
    first = cotangent["value"]
    step()
    assert cotangent["value"] is first


def test_emulated_backends_are_opt_in():
    names = {p.name for p in select_providers("image_text_attention", CPU)}
    assert {"vk-reference", "sdpa", "eager", "flex", "sdpa_runs"} <= names
    assert "vk-cuda_sim" not in names
    named = select_providers("image_text_attention", CPU, ["sdpa"])
    assert [p.name for p in named] == ["sdpa"]
    assert "reference" in vk.op_backends("image_text_attention")


PEERS_NO_FLEX = "vk-reference,sdpa,eager,sdpa_runs,conv,unfold_linear,cat_linear,split_linear"


def test_cli_end_to_end_writes_markdown_csv_and_png(tmp_path, capsys):
    argv = [
        "--op", "all", "--shape", "tiny", "--mask", "1of4,uint8,default,pad",
        "--mode", "fwd,fwd_bwd",
        "--providers", PEERS_NO_FLEX, "--repeats", "5", "--baseline", "sdpa,conv,cat_linear",
        "--out", str(tmp_path), "--name", "tiny", "--quiet", "--threads", "1",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert cli.main(argv) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "| provider | kind | median ms |" in printed
    assert "## image_text_attention / tiny / 1of4 / fp32 / fwd" in printed
    assert "peak RSS delta" in printed
    markdown = (tmp_path / "tiny.md").read_text()
    assert "speedup vs sdpa" in markdown and "speedup vs conv" in markdown
    png = (tmp_path / "tiny.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    with open(tmp_path / "tiny.csv") as f:
        rows = list(csv.DictReader(f))
    cases = {(r["op"], r["variant"], r["mode"]) for r in rows}
    assert len(cases) == 4 * 2  # four ops x two modes, one variant each
    assert all(r["status"] == "ok" for r in rows), [
        r["reason"] for r in rows if r["status"] != "ok"
    ]
    baselines = {
        "image_text_attention": "sdpa",
        "patch_embed": "conv",
        "concat_project": "cat_linear",
        "perceiver_attention": "sdpa",
    }
    for r in rows:
        assert r["baseline"] == baselines[r["op"]]
        assert int(r["repeats"]) == 5 and len(r["samples_ms"].split()) == 5
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["speedup_vs_baseline"]) > 0 and int(r["flops"]) > 0
        assert r["check_against"] == "vk-reference" and float(r["max_abs_err"]) < 1e-4
        if r["provider"] == r["baseline"]:
            assert float(r["speedup_vs_baseline"]) == 1.0
        expected = float(r["flops"]) / (float(r["median_ms"]) * 1e-3) / 1e9
        assert math.isclose(float(r["gflops"]), expected, rel_tol=1e-9)


def test_cli_list_and_help(capsys):
    assert cli.main(["--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("mllama-11b", "clip-vit-l14-336", "flamingo-perceiver", "vk-reference", "flex"):
        assert name in listed
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--op", "--shape", "--mask", "--dtype", "--mode", "--repeats", "--baseline",
                 "--providers", "--threads", "--out", "--list"):  # fmt: skip
        assert flag in text
    with pytest.raises(SystemExit, match="unknown shape"):
        cli.main(["--op", "image_text_attention", "--shape", "nope"])


@pytest.mark.parametrize("variant", ["float", "uint8"])
def test_ceiling_mm_is_the_bare_gemm_of_the_patches(variant):
    """patch_embed's `mm` ceiling: the op's GEMM on the unfolded (normalized) pixels, no epilogue."""
    inputs = registry.get_shape("patch_embed", "tiny").build(variant, torch.float32, CPU, seed=5)
    peer = next(p for p in registry.get_op("patch_embed").peers if p.name == "mm")
    assert peer.ceiling
    got = peer.prepare(inputs)()
    weight = inputs.tensors["weight"]
    patch = weight.shape[-1]
    # F.unfold orders a patch's features (C, kh, kw) like weight.reshape(D, -1).
    columns = torch.nn.functional.unfold(
        patch_embed._normalized_pixels(inputs), patch, stride=patch
    )
    expected = columns.transpose(1, 2) @ weight.reshape(weight.shape[0], -1).t()
    assert got.shape == (expected.shape[0] * expected.shape[1], weight.shape[0])
    torch.testing.assert_close(got, expected.reshape(got.shape), atol=1e-4, rtol=1e-4)


def test_a_ceiling_runs_forward_only_and_is_not_checked_against_the_op():
    from benchmarks.runner import Case, RunConfig, run_case

    providers = [registry.get_provider("patch_embed", n) for n in ("vk-reference", "conv", "mm")]
    for mode in ("fwd", "fwd_bwd"):
        case = Case("patch_embed", "tiny", "float", "fp32", mode)
        results = {
            r.provider: r
            for r in run_case(case, providers, RunConfig(CPU, repeats=2, memory=False))
        }
        assert results["mm"].kind == "ceiling"
        assert results["conv"].status == "ok" and results["conv"].max_abs_err is not None
        if mode == "fwd":
            assert results["mm"].status == "ok" and results["mm"].max_abs_err is None
            assert results["mm"].speedup is not None
        else:
            assert results["mm"].status == "unavailable" and "fwd only" in results["mm"].reason


def test_interleaved_timing_calls_the_steps_in_rounds():
    calls = []

    def step(name):
        return lambda: calls.append(name)

    def failing():
        calls.append("bad")
        raise RuntimeError("boom")

    steps = [step("a"), failing, step("b")]
    got = timing.time_interleaved(steps, CPU, warmup=1, repeats=3)
    # a failing step is called once and not again; the others alternate, round after round
    assert calls == ["a", "bad", "b"] + ["a", "b"] * 3
    assert isinstance(got[1], RuntimeError)
    assert [len(t.samples_ms) for t in (got[0], got[2])] == [3, 3]
    with pytest.raises(ValueError, match="repeats"):
        timing.time_interleaved(steps, CPU, warmup=0, repeats=0)


@pytest.mark.parametrize("interleave", [True, False])
def test_run_case_times_every_provider_in_both_orders(interleave):
    from benchmarks.runner import Case, RunConfig, run_case

    providers = [registry.get_provider("patch_embed", n) for n in ("vk-reference", "conv")]
    case = Case("patch_embed", "tiny", "float", "fp32", "fwd")
    config = RunConfig(CPU, repeats=3, interleave=interleave)
    results = run_case(case, providers, config)
    for r in results:
        assert r.status == "ok", r.reason
        assert len(r.samples_ms) == 3 and r.median_ms > 0 and r.peak_mem_bytes is not None
    assert results[0].speedup is not None and results[1].max_abs_err is not None
