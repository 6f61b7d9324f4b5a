"""``python -m vlm_kernels.tools.gpu_check --dry-run``: the GPU check's plumbing, run on this CPU (the
Triton interpreter and the SIMT emulator, tiny shapes), so the script a borrowed GPU runs cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.devices import cpu_only
from vlm_kernels.tools import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@cpu_only
def test_dry_run_writes_the_report(tmp_path):
    out = tmp_path / "gpu-check"
    run = subprocess.run(
        [sys.executable, "-m", "vlm_kernels.tools.gpu_check", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "torch" in run.stdout and "triton" in run.stdout  # the versions it ran on
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files  # what the device tool brings back
    assert all(len(p.relative_to(out).parts) <= 2 for p in files), files
    figures = json.loads((out / "figures.json").read_text())
    stages = {s["name"]: s for s in figures["stages"]}
    assert set(stages) == {"build", "pytest", "model", "configs", "bench"}
    assert all(s["status"] == "ok" for s in stages.values()), stages
    assert stages["pytest"]["figures"]["passed"] > 0
    model = {r["what"]: r for r in stages["model"]["figures"]["commands"]}
    assert model["generate interleaved --cuda-graph"]["reason"] == gpu_check.DRY_RUN_GRAPH_REASON
    kernels = stages["configs"]["figures"]["kernels"]
    # Every attention kernel, and only those: the sweep's cases are attention cases.
    import vlm_kernels.triton.image_text_attention  # noqa: F401  (declares its kernels' configs)
    from vlm_kernels.triton._launch import triton_config_counts

    assert kernels == {
        k: n for k, n in triton_config_counts().items() if k.startswith("image_text_attention")
    }
    ran = {(c["kernel"], c["config"]) for c in stages["configs"]["figures"]["cases"]}
    assert ran == {
        (k, i) for k, n in kernels.items() for i in range(n)
    }  # every config of every kernel
    report = (out / "report.md").read_text()
    assert "| configs | ok |" in report and "sdpa_nomask" in report
    # The bench stage times every op against its peers (the dry run: the reference, on the CPU).
    bench_rows = stages["bench"]["figures"]["rows"]
    ops = {"image_text_attention", "perceiver_attention", "patch_embed", "concat_project"}
    assert {r["op"] for r in bench_rows} == ops
    assert all(r["status"] == "ok" for r in bench_rows if r["provider"] == "vk-reference")
    assert all(f"| {op} | tiny |" in report for op in ops)
    # Decode, eager vs CUDA graph: the eager path timed, the graph rows skipped with the reason.
    decode = stages["bench"]["figures"]["decode_graph"]
    assert {(r["what"].split()[0], r["batch"]) for r in decode} == {
        (what, batch) for what in ("image_text_attention", "model") for batch in (1, 8)
    }
    for row in decode:
        assert row["status"] == "skipped" and row["reason"] == gpu_check.DRY_RUN_GRAPH_REASON
        assert row["eager_ms"] > 0 and row["graph_ms"] is None, row
    assert "## decode: eager vs CUDA graph" in report
    # The 4 decode rows, and the model stage's generate --cuda-graph in its summary.
    assert report.count("skipped: CUDA graphs need a GPU") == 5


@cpu_only
def test_config_sweep_reports_a_wrong_kernel(tmp_path, monkeypatch):
    """A kernel off by a 5% softmax scale fails the sweep, naming kernel, config and case."""
    from vlm_kernels.triton import image_text_attention as ita

    original = ita.image_text_attention_fwd_triton

    def off_by_five_percent(q, k, v, media_mask, media_len, scale, empty_rows):
        return original(q, k, v, media_mask, media_len, scale * 1.05, empty_rows)

    monkeypatch.setattr(ita, "image_text_attention_fwd_triton", off_by_five_percent)
    monkeypatch.setattr(gpu_check, "triton_config_counts", lambda: {"image_text_attention_fwd": 1})
    result = gpu_check.StageResult("configs")
    gpu_check.stage_configs(result, tmp_path, budget_s=60, dry_run=True)
    assert result.status == "failed", result.summary
    failed = [c for c in result.figures["cases"] if c["status"] != "ok"]
    assert failed and all(c["kernel"] for c in failed)
    assert "error" in failed[0]["detail"]


@pytest.mark.parametrize("dry_run", [True, False])
def test_every_config_case_is_well_formed(dry_run):
    for index in range(8):
        small, large = gpu_check.config_cases(dry_run, index)
        for case in small + large:
            assert case.heads_q % case.heads_kv == 0 and case.chunks >= 2
    if not dry_run:  # the GPU sweep covers each dtype at each head dim over 4 configs
        covered = {
            (c.dtype, c.head_dim) for i in range(4) for c in gpu_check.config_cases(False, i)[0]
        }
        assert covered == {
            (d, h) for d in ("float32", "bfloat16", "float16") for h in (64, 80, 96, 128)
        }


def test_sweep_runs_every_config_first():
    """Breadth first: a run cut short after one pass has still run every (kernel, config)."""
    counts = {"a": 3, "b": 1}
    order = gpu_check.sweep_order(counts, dry_run=False)
    first_pass = {(kernel, index) for kernel, index, _ in order[:4]}
    assert first_pass == {("a", 0), ("a", 1), ("a", 2), ("b", 0)}
    cases_per_config = sum(len(c) for c in gpu_check.config_cases(False, 0))
    assert len(order) == 4 * cases_per_config


def test_decode_graph_part_that_raises_is_an_error_row(monkeypatch, tmp_path):
    """A decode part that fails (e.g. a capture that hits a host sync) is reported as an error row
    with its reason and its traceback in the log; the other part still runs."""

    eager_row = dict(gpu_check._decode_row("image_text_attention", 1), eager_ms=0.1)
    model_row = dict(gpu_check._decode_row("model generate", 8), eager_ms=1.0)

    def capture_fails(dry_run, rows):
        rows.append(eager_row)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(gpu_check, "attention_decode_rows", capture_fails)
    monkeypatch.setattr(
        gpu_check, "model_decode_rows", lambda dry_run, rows: rows.append(model_row)
    )
    with open(tmp_path / "bench.log", "w") as log_file:
        rows = gpu_check.decode_graph_rows(False, log_file)
    assert rows[0] is eager_row  # the finished row is kept
    assert rows[1]["status"] == "error" and "stream is capturing" in rows[1]["reason"]
    assert rows[2] is model_row
    assert "Traceback" in (tmp_path / "bench.log").read_text()


@cpu_only
def test_model_stage_runs_the_cli_on_the_device_and_reports_the_graph_skip(tmp_path):
    """The model stage (dry run: on the CPU): train with a periodic eval, resume and extend,
    generate, eval and a text-only generate ran; the CUDA-graph generate is skipped with the reason."""
    result = gpu_check.StageResult("model")
    gpu_check.stage_model(result, tmp_path, budget_s=120, dry_run=True)
    assert result.status == "ok", result.summary
    rows = {r["what"]: r for r in result.figures["commands"]}
    assert result.figures["device"] == "cpu"
    for what in ("train", "resume --steps 6", "generate video", "eval"):
        assert rows[what]["status"] == "ok" and rows[what]["exit_code"] == 0, rows[what]
    assert rows["generate text only (media=None)"]["text"].startswith("<bos> video")
    graph = rows["generate interleaved --cuda-graph"]
    assert graph["status"] == "skipped" and graph["reason"] == gpu_check.DRY_RUN_GRAPH_REASON
    log = (tmp_path / "model.log").read_text()
    assert "trained to step 6" in log and "every caption right" in log


@cpu_only
def test_model_stage_fails_on_a_command_that_fails(tmp_path, monkeypatch):
    """A model command that exits non-zero fails the stage by name; the commands after it, which
    read its output, do not run."""
    import model.cli

    real_main = model.cli.main

    def generate_fails(argv):
        return 2 if argv[0] == "generate" else real_main(argv)

    monkeypatch.setattr(model.cli, "main", generate_fails)
    result = gpu_check.StageResult("model")
    gpu_check.stage_model(result, tmp_path, budget_s=120, dry_run=True)
    assert result.status == "failed"
    assert result.summary.startswith("failed: generate video")
    assert [r["what"] for r in result.figures["commands"]] == [
        "train",
        "resume --steps 6",
        "generate video",
    ]
