// Python bindings of vlm_kernels._C. The public ops are torch.library custom ops defined in Python
// (vlm_kernels/ops); they call these functions from their kernel tables.
#include <torch/extension.h>

#include "sim/simt_settings.h"
#include "torch/concat_project_cpu.h"
#include "torch/concat_project_gpu.h"
#include "torch/image_text_attention_bwd_gpu.h"
#include "torch/image_text_attention_cpu.h"
#include "torch/image_text_attention_gpu.h"
#include "torch/ops.h"
#include "torch/patch_embed_cpu.h"
#include "torch/patch_embed_gpu.h"
#include "torch/perceiver_attention_cpu.h"
#include "torch/perceiver_attention_gpu.h"

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
  m.def("image_text_attention_bwd_cuda", &vlmk::image_text_attention_bwd_cuda, "grad_out"_a, "q"_a,
        "k"_a, "v"_a, "media_mask"_a, "out"_a, "lse"_a, "media_len"_a, "scale"_a, "uniform"_a);
  m.def("patch_embed_fwd_cuda", &vlmk::patch_embed_fwd_cuda, "pixels"_a, "weight"_a, "bias"_a,
        "cls_token"_a, "pos_embed"_a, "pixel_mean"_a, "pixel_std"_a);
  m.def("patch_embed_bwd_cuda", &vlmk::patch_embed_bwd_cuda, "grad_out"_a, "pixels"_a, "weight"_a,
        "pixel_mean"_a, "pixel_std"_a, "has_cls"_a, "need_pixels_grad"_a);
  m.def("concat_project_fwd_cuda", &vlmk::concat_project_fwd_cuda, "features"_a, "weight"_a,
        "bias"_a);
  m.def("perceiver_attention_fwd_cuda", &vlmk::perceiver_attention_fwd_cuda, "q"_a, "k_media"_a,
        "v_media"_a, "k_latents"_a, "v_latents"_a, "media_padding_mask"_a, "scale"_a);
  m.def("perceiver_attention_bwd_cuda", &vlmk::perceiver_attention_bwd_cuda, "grad_out"_a, "q"_a,
        "k_media"_a, "v_media"_a, "k_latents"_a, "v_latents"_a, "media_padding_mask"_a, "out"_a,
        "lse"_a, "scale"_a);
  m.def("concat_project_bwd_cuda", &vlmk::concat_project_bwd_cuda, "grad_out"_a, "features"_a,
        "weight"_a);
#else
  m.def("built_with_cuda", [] { return false; });
#endif
  // Semicolon-separated SM versions the CUDA kernels were compiled for ("" in a CPU-only build).
  m.def("cuda_archs", [] { return std::string(VLMK_CUDA_ARCHS); });
  m.def("block_chunk_schedule_cpu", &vlmk::block_chunk_schedule_cpu, "media_mask"_a, "block_q"_a);
  m.def("block_chunk_schedule_cuda_sim", &vlmk::block_chunk_schedule_cuda_sim, "media_mask"_a,
        "block_q"_a);
  m.def("concat_project_fwd_cpu", &vlmk::concat_project_fwd_cpu, "features"_a, "weight"_a,
        "bias"_a);
  m.def("concat_project_bwd_cpu", &vlmk::concat_project_bwd_cpu, "grad_out"_a, "features"_a,
        "weight"_a);
  m.def("image_text_attention_fwd_cpu", &vlmk::image_text_attention_fwd_cpu, "q"_a, "k"_a, "v"_a,
        "media_mask"_a, "media_len"_a, "scale"_a, "empty_rows"_a);
  m.def("image_text_attention_bwd_cpu", &vlmk::image_text_attention_bwd_cpu, "grad_out"_a, "q"_a,
        "k"_a, "v"_a, "media_mask"_a, "out"_a, "lse"_a, "media_len"_a, "scale"_a, "empty_rows"_a);
  m.def("image_text_attention_cpu_supported", &vlmk::image_text_attention_cpu_supported);
  m.def("patch_embed_fwd_cpu", &vlmk::patch_embed_fwd_cpu, "pixels"_a, "weight"_a, "bias"_a,
        "cls_token"_a, "pos_embed"_a, "pixel_mean"_a, "pixel_std"_a);
  m.def("patch_embed_bwd_cpu", &vlmk::patch_embed_bwd_cpu, "grad_out"_a, "pixels"_a, "weight"_a,
        "pixel_mean"_a, "pixel_std"_a, "has_cls"_a, "need_pixels_grad"_a);
  m.def("patch_embed_cpu_avx512", &vlmk::patch_embed_cpu_avx512);
  m.def("perceiver_attention_fwd_cpu", &vlmk::perceiver_attention_fwd_cpu, "q"_a, "k_media"_a,
        "v_media"_a, "k_latents"_a, "v_latents"_a, "media_padding_mask"_a, "scale"_a);
  m.def("perceiver_attention_bwd_cpu", &vlmk::perceiver_attention_bwd_cpu, "grad_out"_a, "q"_a,
        "k_media"_a, "v_media"_a, "k_latents"_a, "v_latents"_a, "media_padding_mask"_a, "out"_a,
        "lse"_a, "scale"_a);
  m.def("perceiver_attention_cpu_supported", &vlmk::perceiver_attention_cpu_supported);
  m.def("image_text_attention_fwd_cuda_sim", &vlmk::image_text_attention_fwd_cuda_sim, "q"_a, "k"_a,
        "v"_a, "media_mask"_a, "media_len"_a, "scale"_a, "uniform"_a);
  m.def("image_text_attention_bwd_cuda_sim", &vlmk::image_text_attention_bwd_cuda_sim, "grad_out"_a,
        "q"_a, "k"_a, "v"_a, "media_mask"_a, "out"_a, "lse"_a, "media_len"_a, "scale"_a,
        "uniform"_a);
  m.def("patch_embed_fwd_cuda_sim", &vlmk::patch_embed_fwd_cuda_sim, "pixels"_a, "weight"_a,
        "bias"_a, "cls_token"_a, "pos_embed"_a, "pixel_mean"_a, "pixel_std"_a);
  m.def("patch_embed_bwd_cuda_sim", &vlmk::patch_embed_bwd_cuda_sim, "grad_out"_a, "pixels"_a,
        "weight"_a, "pixel_mean"_a, "pixel_std"_a, "has_cls"_a, "need_pixels_grad"_a);
  m.def("concat_project_fwd_cuda_sim", &vlmk::concat_project_fwd_cuda_sim, "features"_a, "weight"_a,
        "bias"_a);
  m.def("concat_project_bwd_cuda_sim", &vlmk::concat_project_bwd_cuda_sim, "grad_out"_a,
        "features"_a, "weight"_a);
  m.def("perceiver_attention_fwd_cuda_sim", &vlmk::perceiver_attention_fwd_cuda_sim, "q"_a,
        "k_media"_a, "v_media"_a, "k_latents"_a, "v_latents"_a, "media_padding_mask"_a, "scale"_a);
  m.def("perceiver_attention_bwd_cuda_sim", &vlmk::perceiver_attention_bwd_cuda_sim, "grad_out"_a,
        "q"_a, "k_media"_a, "v_media"_a, "k_latents"_a, "v_latents"_a, "media_padding_mask"_a,
        "out"_a, "lse"_a, "scale"_a);
  // The SIMT emulator's settings for the cuda_sim launches that follow (the SIMT_* environment
  // variables are read once per process). Arguments left None keep their value; returns the
  // previous settings as a dict, which can be passed back to restore them.
  m.def(
      "simt_set_config",
      [](std::optional<bool> racecheck, std::optional<std::string> schedule,
         std::optional<uint64_t> seed, std::optional<int> num_threads) {
        const vlmk::sim::SimtSettings previous = vlmk::sim::simt_settings();
        vlmk::sim::SimtSettings next = previous;
        if (racecheck) next.racecheck = *racecheck;
        if (schedule) next.schedule = *schedule;
        if (seed) next.seed = *seed;
        if (num_threads) next.num_threads = *num_threads;
        vlmk::sim::set_simt_settings(next);
        return pybind11::dict("racecheck"_a = previous.racecheck, "schedule"_a = previous.schedule,
                              "seed"_a = previous.seed, "num_threads"_a = previous.num_threads);
      },
      "racecheck"_a = pybind11::none(), "schedule"_a = pybind11::none(),
      "seed"_a = pybind11::none(), "num_threads"_a = pybind11::none());
  // A kernel with a planted shared-memory race under the current settings: (error message, the
  // value thread 0 read); proves the race checker and the poison are live in this build.
  m.def("simt_race_probe", [] {
    const vlmk::sim::RaceProbe probe = vlmk::sim::simt_race_probe();
    return std::make_tuple(probe.message, probe.first_value);
  });
  m.def("simt_config", [] {
    const vlmk::sim::SimtSettings s = vlmk::sim::simt_settings();
    return pybind11::dict("racecheck"_a = s.racecheck, "schedule"_a = s.schedule, "seed"_a = s.seed,
                          "num_threads"_a = s.num_threads);
  });
}
