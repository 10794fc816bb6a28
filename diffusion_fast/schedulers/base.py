"""What ``DDPMScheduler`` and ``DDIMScheduler`` share: config I/O, timesteps, noise, tables, ``add_noise``.

Both keep diffusers' scheduler API and config fields, and run each ``step`` as one fused
``ddpm_step``/``ddim_step`` over a coefficient table built once per ``set_timesteps`` (float64
on the CPU, cached per device). ``betas``/``alphas_cumprod`` (``config.py``) are float32 and
computed as diffusers computes them, so ``add_noise`` equals diffusers' and the tables agree to rounding.

Noise of a step, in order of precedence:

1. ``variance_noise=`` given: used as z (as diffusers' DDIM ``variance_noise``).
2. ``generator=`` given (a ``torch.Generator`` or a list, one per batch element): z is drawn
   exactly as diffusers' ``randn_tensor`` draws it, at the same steps (DDPM: t > 0; DDIM:
   eta > 0), so the same generator gives diffusers' samples and leaves it in the same state.
3. neither: z is generated inside the kernel by Philox from (seed, step = the step's table
   row), identical on every backend and device. The seed is ``scheduler.seed`` if an int;
   if ``None`` (default), a fresh one is drawn from torch's default CPU generator at the first
   noisy step after each ``set_timesteps`` (``torch.manual_seed`` makes it reproducible).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import numbers
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from diffusion_fast.schedulers.config import (
    CONFIG_NAME,
    SchedulerConfig,
    check_common,
    check_int,
    make_betas,
)

__all__ = ["FusedScheduler", "SchedulerOutput"]


@dataclasses.dataclass
class SchedulerOutput:
    """``step``'s result: x_{t-1} and the (clipped) x_0 prediction, each shaped like the sample."""

    prev_sample: Tensor
    pred_original_sample: Tensor

    def to_tuple(self) -> tuple:
        return self.prev_sample, self.pred_original_sample

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


# ---------------------------------------------------------------------------
# The base class.
# ---------------------------------------------------------------------------
class FusedScheduler:
    """Config handling, timesteps, noise and ``add_noise``; subclasses build tables and step."""

    order = 1
    init_noise_sigma = 1.0

    def _setup(self, fields: dict, seed: int | None) -> None:
        cls = type(self).__name__
        fields = dict(fields)
        if fields.get("trained_betas") is not None:  # JSON-able, so save_config and diffusers accept it
            fields["trained_betas"] = [float(b) for b in np.asarray(fields["trained_betas"], dtype=np.float64).ravel()]
        check_common(cls, fields)
        self._internal_dict = SchedulerConfig(_class_name=cls, **fields)  # diffusers' attribute name
        self.betas = make_betas(cls, fields)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if seed is not None:
            check_int(cls, "seed", seed, 0)
            if seed >= 2**64:
                raise ValueError(f"{cls}: seed must be < 2**64, got {seed}")
        self.seed = seed
        self.num_inference_steps = None
        self._use_timesteps(list(range(fields["num_train_timesteps"] - 1, -1, -1)), None)

    # -- config ---------------------------------------------------------------
    @property
    def config(self) -> SchedulerConfig:
        return self._internal_dict

    @classmethod
    def from_config(cls, config: Mapping | None = None, **kwargs):
        """A scheduler from a config mapping (ours, or a diffusers scheduler's ``.config``, or a
        pipeline's ``scheduler_config.json`` as a dict). Fields of other schedulers and private
        keys are ignored; ``kwargs`` (config fields or ``seed``) override the config."""
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise TypeError(f"{cls.__name__}.from_config: config must be a mapping (e.g. a scheduler's .config), "
                            f"got {type(config).__name__}")
        names = set(inspect.signature(cls.__init__).parameters) - {"self", "seed"}
        defaulted = set(config.get("_use_default_values", ()))  # diffusers: keys the file lacked
        values = {k: v for k, v in config.items() if k in names and k not in defaulted}
        return cls(**{**values, **kwargs})

    def save_config(self, save_directory: str | os.PathLike) -> str:
        """Write ``scheduler_config.json`` (diffusers' file name and format) into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(dict(self.config), f, indent=2, sort_keys=True)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        """Load from a local folder holding ``scheduler_config.json`` (a saved pipeline with
        ``subfolder="scheduler"``). Hub ids: ``from_config(diffusers.XScheduler.from_pretrained(id).config)``."""
        folder = os.path.join(path, subfolder) if subfolder else path
        file = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(file):
            raise ValueError(f"{cls.__name__}.from_pretrained: no {CONFIG_NAME} in local folder {folder!r}; for a "
                             "Hub id, load the config with diffusers and pass it to from_config")
        with open(file) as f:
            return cls.from_config(json.load(f), **kwargs)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.config.items() if not k.startswith("_") and k != "trained_betas"}
        fields = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"{type(self).__name__}({fields}, seed={self.seed!r})"

    # -- timesteps ------------------------------------------------------------
    def _use_timesteps(self, timesteps: list[int], device) -> None:
        """Make ``timesteps`` (descending ints in [0, T)) the schedule; tables are rebuilt lazily."""
        cls, n = type(self).__name__, self.config.num_train_timesteps
        bad = [t for t in timesteps if not 0 <= t < n]
        if bad or any(a <= b for a, b in itertools.pairwise(timesteps)):
            raise ValueError(f"{cls}.set_timesteps: timesteps must be strictly decreasing ints in [0, {n}), got "
                             f"{timesteps[:3]}...{timesteps[-3:]} (timestep_spacing={self.config.timestep_spacing!r},"
                             f" steps_offset={self.config.steps_offset})")
        self._timesteps = timesteps
        self.timesteps = torch.tensor(timesteps, dtype=torch.int64, device=device)
        self._tables = {}
        self._run_seed = None

    def _check_num_steps(self, num_inference_steps) -> None:
        n = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) \
                or not 1 <= num_inference_steps <= n:
            raise ValueError(f"{type(self).__name__}.set_timesteps: num_inference_steps must be an int in "
                             f"[1, num_train_timesteps={n}], got {num_inference_steps!r}")

    def _timestep(self, timestep) -> int:
        """A Python int from an int or a one-element integer tensor (a host sync if on a GPU)."""
        if isinstance(timestep, Tensor):
            if timestep.numel() != 1 or timestep.dtype.is_floating_point or timestep.dtype.is_complex \
                    or timestep.dtype == torch.bool:
                raise TypeError(f"{type(self).__name__}.step: timestep must be an int or a one-element integer "
                                f"tensor, got a {timestep.dtype} tensor of shape {tuple(timestep.shape)}")
            return int(timestep.item())
        if isinstance(timestep, bool) or not isinstance(timestep, numbers.Integral):
            raise TypeError(f"{type(self).__name__}.step: timestep must be an int, got {type(timestep).__name__}")
        return int(timestep)

    def _row(self, t: int) -> int:
        try:
            return self._rows[t]
        except KeyError:
            raise ValueError(f"{type(self).__name__}.step: timestep {t} is not one of scheduler.timesteps "
                             f"({self._timesteps[0]} ... {self._timesteps[-1]}, {len(self._timesteps)} steps)"
                             ) from None

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """The model's input at ``timestep``: ``sample`` itself (DDPM/DDIM do not scale it)."""
        return sample

    # -- step plumbing --------------------------------------------------------
    def _check_step_tensors(self, model_output, sample, variance_noise) -> None:
        cls = type(self).__name__
        for name, t in (("model_output", model_output), ("sample", sample), ("variance_noise", variance_noise)):
            if t is None and name == "variance_noise":
                continue
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"{cls}.step: {name} must be a floating tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.shape != sample.shape:
                raise ValueError(f"{cls}.step: {name} must have sample's shape {tuple(sample.shape)}, "
                                 f"got {tuple(t.shape)}")
            if t.device != sample.device:
                raise ValueError(f"{cls}.step: {name} is on {t.device} but sample is on {sample.device}")

    def _draw_noise(self, generator, like: Tensor) -> Tensor:
        """N(0, I) shaped like ``like``, drawn as diffusers' ``randn_tensor`` draws it: a CPU
        generator draws on the CPU, then moves; a list draws one batch element per generator."""
        cls = type(self).__name__
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        if not gens or not all(isinstance(g, torch.Generator) for g in gens):
            raise TypeError(f"{cls}.step: generator must be a torch.Generator or a list of them")
        device, gen_type = like.device, gens[0].device.type
        if gen_type != device.type and gen_type != "cpu":
            raise ValueError(f"{cls}.step: cannot draw {device} noise with a {gen_type} generator")
        rand_device = torch.device("cpu") if gen_type == "cpu" else device
        if len(gens) == 1:
            return torch.randn(like.shape, generator=gens[0], device=rand_device, dtype=like.dtype).to(device)
        if len(gens) != like.shape[0]:
            raise ValueError(f"{cls}.step: a list of generators needs one per batch element ({like.shape[0]}), "
                             f"got {len(gens)}")
        shape = (1,) + tuple(like.shape[1:])
        draws = [torch.randn(shape, generator=g, device=rand_device, dtype=like.dtype) for g in gens]
        return torch.cat(draws).to(device)

    def _philox_seed(self) -> int:
        """``seed``, or one drawn from torch's default generator once per ``set_timesteps``."""
        if self.seed is not None:
            return self.seed
        if self._run_seed is None:
            self._run_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return self._run_seed

    def _table_for(self, key, sample: Tensor) -> Tensor:
        """The float64 CPU table for ``key`` (built by ``_build_table``), cast and moved for ``sample``."""
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        if key not in self._tables:
            self._tables[key] = {"cpu64": self._build_table(key)}
        cached = self._tables[key]
        if (sample.device, dtype) not in cached:
            cached[(sample.device, dtype)] = cached["cpu64"].to(device=sample.device, dtype=dtype)
        return cached[(sample.device, dtype)]

    def _sigma(self, key, row: int) -> float:
        return float(self._tables[key]["cpu64"][row, 5])

    @staticmethod
    def _for_prediction(table: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
        """Rewrite an ε-table for a model output m that predicts x0 ("sample") or v (Salimans &
        Ho 2022): with ε = p x + q m, x0 = (a - b p) x - (b q) m and c2 x + c3 ε = (c2 + c3 p) x + (c3 q) m.
        ``table``: (S, 6) float64; ``abar``: (S,) float64 alphas_cumprod of each row's timestep."""
        if prediction_type == "epsilon":
            return table
        if prediction_type == "sample":  # ε = (x - sqrt(abar) x0) / sqrt(1 - abar)
            p, q = 1 / torch.sqrt(1 - abar), -torch.sqrt(abar / (1 - abar))
        else:  # v_prediction: ε = sqrt(1 - abar) x + sqrt(abar) v
            p, q = torch.sqrt(1 - abar), torch.sqrt(abar)
        a, b, c1, c2, c3, sigma = table.unbind(1)
        return torch.stack([a - b * p, b * q, c1, c2 + c3 * p, c3 * q, sigma], dim=1)

    def _finish(self, out: tuple, return_dict: bool):
        return SchedulerOutput(*out) if return_dict else out

    # -- forward process ------------------------------------------------------
    def _abar_at(self, samples: Tensor, timesteps, name: str) -> tuple:
        """(sqrt(abar_t), sqrt(1 - abar_t)) as (B, 1, ..., 1) in samples' dtype, as diffusers computes them."""
        cls = type(self).__name__
        if not isinstance(samples, Tensor) or not samples.is_floating_point():
            raise TypeError(f"{cls}.{name}: samples must be a floating tensor")
        if not isinstance(timesteps, Tensor):
            timesteps = torch.as_tensor(timesteps)
        if timesteps.dtype.is_floating_point or timesteps.dtype == torch.bool:
            raise TypeError(f"{cls}.{name}: timesteps must hold ints, got {timesteps.dtype}")
        n = self.config.num_train_timesteps
        if timesteps.device.type == "cpu" and timesteps.numel() and not (0 <= timesteps.min() and timesteps.max() < n):
            raise ValueError(f"{cls}.{name}: timesteps must lie in [0, {n}), got "
                             f"[{timesteps.min().item()}, {timesteps.max().item()}]")
        abar = self.alphas_cumprod.to(device=samples.device, dtype=samples.dtype)[timesteps.to(samples.device)]
        shape = (-1,) + (1,) * (samples.dim() - 1)
        return (abar**0.5).flatten().reshape(shape), ((1 - abar) ** 0.5).flatten().reshape(shape)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """q(x_t | x_0) sample: sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (Ho et al. 2020, Eq. 4).
        ``timesteps``: (B,) ints (or one), broadcast over the sample dims."""
        if not isinstance(noise, Tensor) or noise.shape != getattr(original_samples, "shape", None):
            raise ValueError(f"{type(self).__name__}.add_noise: noise must be a tensor of original_samples' shape "
                             f"{tuple(getattr(original_samples, 'shape', ()))}, "
                             f"got {tuple(getattr(noise, 'shape', ()))}")
        s, s1 = self._abar_at(original_samples, timesteps, "add_noise")
        return s * original_samples + s1 * noise

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps) -> Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022), the v-prediction target."""
        if not isinstance(noise, Tensor) or noise.shape != getattr(sample, "shape", None):
            raise ValueError(f"{type(self).__name__}.get_velocity: noise must be a tensor of sample's shape")
        s, s1 = self._abar_at(sample, timesteps, "get_velocity")
        return s * noise - s1 * sample
