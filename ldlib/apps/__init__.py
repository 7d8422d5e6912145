"""What people run: cli, demo, experiment, evaluate, export, upscale, analysis, bench.

Rule: may import anything in ldlib; nothing in ldlib imports apps.
"""
