"""Data on disk: (HQ, LQ) pairs, latent caches, the Datasets the loops read, cached teacher outputs.

Rule: imports core, presets and models; jobs take objects (a codec, a degrader), not names.
"""
