"""Foundations every stage uses: files, images, config, metrics, runs, profiling, PCA, shipped samples.

Rule: imports no other ldlib code (only its own modules).
"""
