"""Packaging: import without triton, the compiled core, the console script."""
import subprocess
import sys


def test_import_and_cpu_ops_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now fails
        "import torch, collapsekit as ck\n"
        "s, c = ck.class_means(torch.randn(10, 4), torch.arange(10) % 3, 3)\n"
        "assert c.tolist() == [4.0, 3.0, 3.0]\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n"
        "    ck.class_sums(torch.randn(2, 2), torch.zeros(2, dtype=torch.long), 1, backend='triton')\n"
        "except ImportError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('expected ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compiled_core():
    import collapsekit._C as C
    assert C.isa() in ("base", "avx2")
    assert C.max_threads() >= 1


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "collapsekit", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout


def test_ci_runs_the_readme_commands():
    """.ci/run must run the README's own install + test commands (so a missing step fails in CI)."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    test_cmd = 'pip install torch==2.13.0 && pip install ".[test]" && pytest'
    main_cmd = 'pip install torch==2.13.0 && pip install ".[cli]" && collapsekit demo && collapsekit bench'
    assert test_cmd in readme and main_cmd in readme
    assert test_cmd in ci and "collapsekit bench --quick" in ci and "collapsekit demo" in ci


def test_readme_usage_example_runs():
    import pathlib
    import re
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"## Usage\n\n```python\n(.*?)```", readme, re.S).group(1)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
