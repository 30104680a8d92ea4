"""``cai partition`` and ``cai run``."""

from __future__ import annotations

import json

from cai.commands import add_stack_options, bench_subparsers


def register(subparsers):
    p = subparsers.add_parser("partition", help="split a dataset into partitions plus a manifest")
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help=".npz, .h5, the authors' .pt, a folder of .npy, or an SDSS_MGS catalog")
    p.add_argument("--size-mb", type=float, default=25.0, help="partition size in MiB (default 25)")
    p.add_argument("--out", required=True, metavar="DEST", help="a folder or s3://bucket/prefix")
    p.set_defaults(func=partition)

    r = subparsers.add_parser("run", help="predict redshifts for a dataset (default: the embedded demo)")
    r.add_argument("--data", nargs="+", metavar="SRC",
                   help="partitions folder or source files (default: rendered SDSS_MGS.test)")
    r.add_argument("--model", help="weights .safetensors or exported .onnx (default: the demo weights)")
    r.add_argument("--out", default="results", help="folder for summary.json, predictions.*, redshift.png")
    r.add_argument("--backend", choices=("local", "emulated", "aws"), default="local")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--workers", type=int, help="local worker processes (default: one per core)")
    r.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime")
    r.add_argument("--size-mb", type=float, default=25.0, help="partition size when partitioning on the fly")
    r.add_argument("--max-partitions", type=int)
    r.add_argument("--partitions-per-executor", type=int, default=1)
    add_stack_options(r, "aws: ")
    r.add_argument("--state-machine-arn", help="aws: the state machine (default: from the stack's outputs)")
    r.add_argument("--result-prefix", help="aws: where the run writes in the bucket (default runs/<time>/)")
    r.set_defaults(func=run)

    m = bench_subparsers(subparsers).add_parser(
        "memory", help="peak memory of a run on N and on FACTOR*N galaxies (constant memory, shown)")
    m.add_argument("--galaxies", type=int, default=5000)
    m.add_argument("--factor", type=int, default=4)
    m.add_argument("--model", help="weights or .onnx (default: the demo weights)")
    m.add_argument("--size-mb", type=float, default=25.0)
    m.add_argument("--json", help="also write the figures as JSON here")
    m.set_defaults(func=bench_memory)


def partition(args) -> int:
    from cai.partitions import write_partitions
    from cai.store import LocalStore, S3Store, split_location

    bucket, prefix = split_location(args.out)
    store = S3Store(bucket) if bucket else LocalStore(prefix)
    manifest = write_partitions(args.sources, store, prefix if bucket else "", args.size_mb)
    print(f"{manifest['galaxies']:,} galaxies in {len(manifest['partitions'])} partitions of up to "
          f"{manifest['galaxies_per_partition']:,} galaxies -> {args.out}")
    return 0


def run(args) -> int:
    from cai.run import describe, run as run_cai

    aws = {"stack": args.stack, "region": args.region, "profile": args.profile, "bucket": args.bucket,
           "state_machine_arn": args.state_machine_arn, "result_prefix": args.result_prefix} \
        if args.backend == "aws" else {}
    summary, outputs = run_cai(
        data=args.data, model=args.model, out=args.out, backend=args.backend, batch_size=args.batch_size,
        workers=args.workers, runtime=args.runtime, size_mb=args.size_mb, max_partitions=args.max_partitions,
        partitions_per_executor=args.partitions_per_executor, **aws)
    print(describe(summary, outputs))
    return 1 if summary["galaxies_failed"] else 0


def bench_memory(args) -> int:
    from cai.bench_memory import memory

    rows = memory(args.galaxies, args.factor, args.model, args.size_mb)
    print(f"{'galaxies':>9} {'dataset MB':>11} {'partition peak MB':>18} {'run peak MB':>12} {'run s':>7}")
    for row in rows:
        print(f"{row['galaxies']:>9,} {row['dataset_mb']:>11,.1f} {row['partition_peak_mb']:>18,.1f} "
              f"{row['run_peak_mb']:>12,.1f} {row['run_seconds']:>7.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0
