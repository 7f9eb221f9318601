"""pytest-benchmark suites over the same workloads as `collapsekit bench`.

    pytest bench/ --benchmark-group-by=group            # quick shapes, CPU
    pytest bench/ --ck-full --ck-device cuda             # the full shapes on a GPU
"""


def pytest_addoption(parser):
    parser.addoption("--ck-full", action="store_true", help="full-size workloads (default: the --quick ones)")
    parser.addoption("--ck-device", default="cpu", choices=["cpu", "cuda"])
