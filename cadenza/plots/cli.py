"""`cadenza visualize`: Ludwig's `visualize` flags over cadenza.plots.visualize. Registered by cadenza.cli; builds
its parser from the light tables in catalog.py, so `cadenza --help` imports no numpy, pandas or matplotlib."""

from __future__ import annotations

import argparse

from .catalog import FLAGS, VISUALIZATIONS


def register_cli(sub) -> None:
    names = "\n".join(f"  {v.name}: {v.summary}" for v in VISUALIZATIONS.values())
    p = sub.add_parser("visualize", help="plots from training/test statistics, predictions and hyperopt results",
                       description="Plots with Ludwig's visualization names and flags (docs/visualize.md). "
                       "Visualizations:\n" + names, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--visualization", required=True, choices=list(VISUALIZATIONS), metavar="NAME",
                   help="the visualization (listed above)")
    for f in FLAGS:
        p.add_argument(*f.names, dest=f.field, help=f.help, metavar="FILE",
                       **({"nargs": "+", "default": []} if f.many else {}))
    p.add_argument("-od", "--output_directory", default="visualizations", help="where the plots go")
    p.add_argument("-ff", "--file_format", default="pdf", choices=["pdf", "png"])
    p.add_argument("-mn", "--model_names", nargs="+", default=[], help="one name per file, for legends and "
                   "file names (default: each file's folder name)")
    p.add_argument("-ofn", "--output_feature_name", help="plot this output only (default: every output it fits)")
    p.add_argument("-tn", "--top_n_classes", nargs="+", type=int, default=[0],
                   help="only the N most frequent classes (0: all); confusion_matrix draws one plot per N")
    p.add_argument("-n", "--normalize", action="store_true", help="confusion_matrix: shares of each true class")
    p.set_defaults(func=cmd_visualize)


def cmd_visualize(args) -> None:
    from . import visualize

    written = visualize(args.visualization, output_directory=args.output_directory, file_format=args.file_format,
                        model_names=args.model_names, output_feature_name=args.output_feature_name,
                        top_n_classes=args.top_n_classes, normalize=args.normalize,
                        **{f.field: getattr(args, f.field) for f in FLAGS})
    for path in written:
        print(path)
