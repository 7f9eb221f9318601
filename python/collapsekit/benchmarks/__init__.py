"""Benchmarks behind ``collapsekit bench`` and ``bench/`` (pytest-benchmark).

* :mod:`.workload` — the :class:`Workload` record and the registry (:func:`register`);
* :mod:`.measure` — timing, peak memory, the machine's limits measured in the same run;
* :mod:`.runner` — side-by-side runs, output checks, the table and JSON (:func:`run`);
* one module per op family with its workloads and eager baselines: :mod:`.neural_collapse`,
  :mod:`.ssd_scan`, :mod:`.selective_scan`.
"""
from .measure import machine_info, peak_extra_bytes, sync, time_call  # noqa: F401
from .runner import check_outputs, format_table, run, run_workload, select  # noqa: F401
from .workload import WORKLOADS, Workload, fwd_bwd, register  # noqa: F401

# the families register their workloads on import (table order = import order)
from . import neural_collapse, ssd_scan, selective_scan, accumulator  # noqa: F401,E402
from .neural_collapse import eager_class_means, eager_within_class_variance  # noqa: F401,E402
from .ssd_scan import eager_ssd_chunked, eager_ssd_loop  # noqa: F401,E402
