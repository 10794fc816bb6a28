// The Gaussian noise of one tile (csrc/philox.h) for CPU kernels: Philox for the tile's 256
// counters (AVX2/AVX-512 when present, philox_x86.h), then Box-Muller. Shared by every CPU
// kernel that makes noise (sampler_steps, langevin_step).
#pragma once

#include <cstdint>

namespace diffusion_fast {
namespace philox {

// z[k * 256 + j] = the noise of element 1024 * tile + 256 * k + j of (seed, step);
// key = (seed_lo, seed_hi). acc_t: float or double; z holds kTileElements values.
template <typename acc_t>
void tile_noise(int64_t tile, uint32_t step, uint32_t key_lo, uint32_t key_hi, acc_t* z);

}  // namespace philox
}  // namespace diffusion_fast
