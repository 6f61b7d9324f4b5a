// The patch_embed CPU kernels of cpu/patch_embed.cpp built a second time, for the baseline ISA: the
// same source with its portable loops in place of the AVX-512 ones (the GEMMs are oneDNN's / MKL's
// either way). The glue runs these where the CPU lacks AVX-512 (an AVX2-only EPYC, say) or
// VLMK_CPU_NO_AVX512=1 is set (so that tests reach them on any machine).
#define VLMK_PE_PORTABLE 1
#include "cpu/patch_embed.cpp"  // NOLINT(bugprone-suspicious-include)
