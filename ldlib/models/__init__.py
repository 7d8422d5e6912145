"""Models and their file formats: codecs, the 2x decoder module, proxy net, teacher folders, losses, tiny configs.

Rule: imports core only; knows no run folders, no presets by name.
"""
