"""Triton GPU kernels, one module per op family. Shipped as ``collapsekit.kernels``.

Importing a module here imports triton; collapsekit only does so on the first Triton call.
"""
