// Python bindings of vlm_kernels._C. The public ops are torch.library custom ops defined in Python
// (vlm_kernels/ops); they call these functions from their kernel tables.
#include <torch/extension.h>

#include "torch/image_text_attention_cpu.h"
#include "torch/image_text_attention_gpu.h"
#include "torch/ops.h"

#ifndef VLMK_CUDA_ARCHS
#define VLMK_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.doc() = "vlm_kernels C++/CUDA kernels";
#if defined(VLMK_WITH_CUDA)
  m.def("built_with_cuda", [] { return true; });
  m.def("block_chunk_schedule_cuda", &vlmk::block_chunk_schedule_cuda, "media_mask"_a, "block_q"_a);
  m.def("image_text_attention_fwd_cuda", &vlmk::image_text_attention_fwd_cuda, "q"_a, "k"_a, "v"_a,
        "media_mask"_a, "media_len"_a, "scale"_a, "uniform"_a);
#else
  m.def("built_with_cuda", [] { return false; });
#endif
  // Semicolon-separated SM versions the CUDA kernels were compiled for ("" in a CPU-only build).
  m.def("cuda_archs", [] { return std::string(VLMK_CUDA_ARCHS); });
  m.def("block_chunk_schedule_cpu", &vlmk::block_chunk_schedule_cpu, "media_mask"_a, "block_q"_a);
  m.def("block_chunk_schedule_cuda_sim", &vlmk::block_chunk_schedule_cuda_sim, "media_mask"_a,
        "block_q"_a);
  m.def("image_text_attention_fwd_cpu", &vlmk::image_text_attention_fwd_cpu, "q"_a, "k"_a, "v"_a,
        "media_mask"_a, "media_len"_a, "scale"_a, "uniform"_a);
  m.def("image_text_attention_bwd_cpu", &vlmk::image_text_attention_bwd_cpu, "grad_out"_a, "q"_a,
        "k"_a, "v"_a, "media_mask"_a, "out"_a, "lse"_a, "media_len"_a, "scale"_a, "uniform"_a);
  m.def("image_text_attention_cpu_supported", &vlmk::image_text_attention_cpu_supported);
  m.def("image_text_attention_fwd_cuda_sim", &vlmk::image_text_attention_fwd_cuda_sim, "q"_a, "k"_a,
        "v"_a, "media_mask"_a, "media_len"_a, "scale"_a, "uniform"_a);
}
