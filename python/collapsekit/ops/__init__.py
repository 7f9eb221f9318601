"""One module per op family: validation, torch.library registration, backend dispatch.

The public functions are exported from :mod:`collapsekit`; this package keeps the modules
themselves reachable as ``collapsekit.ops.<family>``."""
