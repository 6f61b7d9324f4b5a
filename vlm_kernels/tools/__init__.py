"""Developer tools run as modules, e.g. ``python -m vlm_kernels.tools.gpu_report``."""
