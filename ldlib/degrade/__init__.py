"""Latent degraders: what a diffusion model does to latents, applied in the normalised latent space.

Every degrader noises latents to a strength sigma the flow-matching way, ``x_s = (1 - s) * x0 + s * eps``, then
maps them back with its ``denoise`` (nothing for the noise-only baseline; the teacher's own Euler loop; a trained
proxy), or serves cached teacher outputs. One module each: ``noise`` (the noising and the base class),
``diffusion`` (the Euler loop as a pure function of (velocity, x, sigmas), and the live teacher), ``cached``,
``proxy``. Names (``none | noise | diffusion | proxy:DIR | teacher:DIR``) become degraders in one place:
``ldlib.build.DEGRADERS`` and ``ldlib.build.parse_degrader``.

Rule: imports core, models and data; takes built objects (a transformer, a net, a folder of cached outputs).
"""

from .cached import CachedTeacher
from .diffusion import DiffusionDegrader, euler, sigma_grid
from .noise import Degrader, NoiseDegrader, add_noise, sample_noise, sigma_tensor
from .proxy import ProxyDegrader


__all__ = ["CachedTeacher", "Degrader", "DiffusionDegrader", "NoiseDegrader", "ProxyDegrader", "add_noise", "euler",
           "sample_noise", "sigma_grid", "sigma_tensor"]
