"""Microbenchmarks of the vlm_kernels ops against PyTorch peers.

    python -m benchmarks --list
    python -m benchmarks --op image_text_attention --shape mllama-11b --mask 1of4 --dtype bf16 \
        --mode fwd --repeats 5 --baseline sdpa --out benchmarks/results
    pytest benchmarks/ --benchmark-only          # pytest-benchmark at the tiny shapes

Layout: spec.py (types), ops/<op>.py (shapes, inputs, FLOPs, peers of one op), registry.py (ops
and providers), timing.py (timers, peak memory), runner.py (cases), report.py (markdown, CSV, PNG),
cli.py (the command line).
"""
