"""ldlib: train a 2x-upscaling VAE decoder that stays clean on diffusion-degraded latents."""

__version__ = "0.1.0"
