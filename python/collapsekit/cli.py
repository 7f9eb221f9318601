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
    d = sub.add_parser("demo", help="train a small MLP on a built-in synthetic task past zero error and watch "
                                     "neural collapse happen (CPU, about 10-30 s)")
    d.add_argument("--lm", action="store_true", help="instead: a tiny causal LM on Python's own source text, "
                                                   "measured with collect_lm (about 2 minutes; see docs/demo.md)")
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default 150; 40 with --lm)")
    d.add_argument("--classes", type=int, default=10, help="number of classes C (default 10)")
    d.add_argument("--dim", type=int, default=128, help="width D of the penultimate layer, the features measured (default 128)")
    d.add_argument("--per-class", type=int, default=300, help="training samples per class (default 300)")
    d.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and the batch order (default 0)")
    d.add_argument("--every", type=int, default=None, help="measure every N epochs (default: epochs // 15)")
    d.add_argument("--loss", default="ce", choices=["ce", "mse"], help="training loss (default ce)")
    d.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    d.add_argument("--threads", type=int, default=None, help="CPU threads for training (default 1; see docs/demo.md)")
    d.add_argument("--out", default=None, help="the figure (default collapse.png, collapse_lm.png with --lm; '' for none)")
    a = sub.add_parser("analyze", help="measure neural collapse of saved features (.pt, .npz, .safetensors)")
    a.add_argument("file", help="a .pt, .npz or .safetensors file with features [N, D] and labels [N] "
                                "(optionally weight [C, D] and bias [C])")
    a.add_argument("--num-classes", type=int, default=None, help="C (default: max label + 1, or weight's rows)")
    a.add_argument("--batch-size", type=int, default=65536, help="rows per streamed batch (default 65536)")
    a.add_argument("--features-key", default="features", help="name of the features array (default features)")
    a.add_argument("--labels-key", default="labels", help="name of the labels array (default labels)")
    a.add_argument("--weight-key", default="weight", help="name of the classifier weight, if any (default weight)")
    a.add_argument("--bias-key", default="bias", help="name of the classifier bias, if any (default bias)")
    a.add_argument("--device", default="cpu", help="where the batches are measured (default cpu)")
    a.add_argument("--json", metavar="PATH", help="write the metrics (and per-class arrays) as JSON")
    a.add_argument("--plot", metavar="PATH", help="write the per-class figure (mean norm and variance vs class count)")
    lm = sub.add_parser("analyze-lm", help="neural collapse of a local transformers causal LM over token ids "
                                           "(.npy, .pt, .safetensors), in one pass")
    lm.add_argument("model_dir", help="a local model directory (save_pretrained); nothing is downloaded")
    lm.add_argument("tokens", help="integer token ids [num_seqs, L], or a 1-D stream with --seq-len")
    lm.add_argument("--seq-len", type=int, default=None, help="cut a 1-D token stream into rows of this length")
    lm.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    lm.add_argument("--device", default="cpu", help="where the model runs (default cpu)")
    lm.add_argument("--layers", default=None, help="also these hidden-state indices, e.g. 0,6,-2 "
                                                    "(transformers' output_hidden_states numbering)")
    lm.add_argument("--min-count", type=float, default=1, help="tokens seen fewer times count as absent (default 1)")
    lm.add_argument("--max-count", type=float, default=None, help="tokens seen more times count as absent")
    lm.add_argument("--decisions", action="store_true", help="a second pass for NC4 (classifier vs nearest mean)")
    lm.add_argument("--json", metavar="PATH", help="write the metrics (and per-token arrays) as JSON")
    lm.add_argument("--plot", metavar="PATH", help="write the per-token figure against token frequency")
    lm.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from . import benchmarks

        benchmarks.run(device=args.device, quick=args.quick, json_path=args.json,
                       compile_baselines=not args.no_compile, reps=args.reps, op=args.op)
    elif args.command == "demo":
        from . import demo

        return demo.main(args)
    elif args.command == "analyze":
        from . import analyze

        return analyze.main(args)
    elif args.command == "analyze-lm":
        from . import analyze_lm

        return analyze_lm.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
