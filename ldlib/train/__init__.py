"""Training loops: the decoder, the teacher and the proxy.

Rule: imports anything below (core ... build); loops take built objects and configs; nothing below imports train.
"""
