"""The ``collapsekit`` command line."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="collapsekit", description="collapsekit: fast neural-collapse and state-scan kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark every op against eager PyTorch (and torch.compile)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--quick", action="store_true", help="small shapes (a minute on a laptop; what CI runs)")
    b.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    b.add_argument("--reps", type=int, default=None, help="repetitions per provider (median reported)")
    b.add_argument("--op", default=None, help="only workloads of this op")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from . import benchmarks

        benchmarks.run(device=args.device, quick=args.quick, json_path=args.json,
                       compile_baselines=not args.no_compile, reps=args.reps, op=args.op)
    return 0


if __name__ == "__main__":
    sys.exit(main())
