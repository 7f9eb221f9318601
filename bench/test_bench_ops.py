"""One benchmark per (workload, provider): eager baseline, its torch.compile, collapsekit.

Workloads come from collapsekit.benchmarks (the registry `collapsekit bench` runs), so both
tools time the same code on the same inputs. The timer synchronises CUDA around each call.
"""
import pytest
import torch

from collapsekit import benchmarks

_cache = {}


def _workloads(config):
    return benchmarks.select(config.getoption("--ck-device"), quick=not config.getoption("--ck-full"))


def pytest_generate_tests(metafunc):
    if "workload" in metafunc.fixturenames:
        ws = _workloads(metafunc.config)
        params = []
        for w in ws:
            for provider in list(w.baselines) + [b + "_compiled" for b in w.baselines if w.compile] + ["collapsekit"]:
                params.append(pytest.param(w, provider, id=f"{w.op}-{w.label.replace(' ', '-')}-{provider}"))
        metafunc.parametrize("workload,provider", params)


def _inputs(w, device):
    key = (id(w), device)
    if key not in _cache:
        _cache.clear()  # one workload's inputs alive at a time
        _cache[key] = w.make(torch.device(device))
    return _cache[key]


def test_op(benchmark, workload, provider, request):
    device = request.config.getoption("--ck-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    inp = _inputs(workload, device)
    if provider == "collapsekit":
        fn = workload.collapsekit
    elif provider.endswith("_compiled"):
        fn = torch.compile(workload.baselines[provider[: -len("_compiled")]])
    else:
        fn = workload.baselines[provider]
    dev = torch.device(device)

    def call():
        out = fn(**inp)
        benchmarks.sync(dev)
        return out

    call()  # warm-up / compile outside the timing
    benchmark.group = f"{workload.op} {workload.label} {str(workload.dtype).replace('torch.', '')} {device}"
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info["bytes_moved"] = workload.bytes_moved(inp)
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)


def test_outputs_match_baseline(request):
    """Every workload's collapsekit call computes what its first baseline computes (the check
    `collapsekit bench` makes before timing), on the selected shapes."""
    device = request.config.getoption("--ck-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    checked = 0
    for w in _workloads(request.config):
        if not w.baselines:
            continue
        inp = w.make(torch.device(device))
        ref = next(iter(w.baselines.values()))
        benchmarks.check_outputs(w, w.collapsekit(**inp), ref(**inp), inp)
        checked += 1
        del inp
    assert checked > 0
