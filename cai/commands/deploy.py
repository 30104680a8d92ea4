"""``cai upload`` and ``cai payload``: data, models and run input for a deployed stack."""

from __future__ import annotations

import json

from cai.commands import add_stack_options


def register(subparsers):
    u = subparsers.add_parser("upload", help="upload partitions and model files to a deployed stack's bucket")
    u.add_argument("paths", nargs="+", metavar="PATH",
                   help="partition folders or dataset files (one dataset), and .onnx/.safetensors model files")
    add_stack_options(u)
    u.add_argument("--prefix", help="the dataset's prefix in the bucket (default partitions/<UTC time>/)")
    u.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime",
                   help="the runtime the model is for: onnxruntime uploads weights exported to ONNX (default)")
    u.add_argument("--size-mb", type=float, default=25.0, help="partition size when partitioning files (MiB)")
    u.add_argument("--workdir", default="results", help="where dataset files are partitioned before upload")
    u.set_defaults(func=upload)

    p = subparsers.add_parser("payload", help="write the state machine input (payload.json) for a deployed stack")
    add_stack_options(p)
    p.add_argument("--partition-prefix", help="the partitions' prefix in the bucket (default: the last cai upload's)")
    p.add_argument("--model-key", help="the model's key in the bucket (default: the last cai upload's)")
    p.add_argument("--result-prefix", help="where the run writes (default runs/<UTC time>/)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--runtime", choices=("onnxruntime", "torch"))
    p.add_argument("--partitions-per-executor", type=int)
    p.add_argument("--max-partitions", type=int)
    p.add_argument("--max-concurrency", type=int, help="most executors at once (Initialize's default 1000)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="do not look the partitions and model up in the bucket")
    p.add_argument("--out", default="payload.json", help="the file to write (default payload.json)")
    p.set_defaults(func=payload)


def upload(args) -> int:
    from cai.deploy import upload as upload_paths

    done = upload_paths(args.paths, args.stack, args.region, args.profile, args.bucket, args.prefix,
                        args.runtime, args.size_mb, args.workdir)
    if done["partition_prefix"]:
        print(f"partitions: s3://{done['bucket']}/{done['partition_prefix']}")
    for key in done["model_keys"]:
        print(f"model:      s3://{done['bucket']}/{key}")
    print(f"next: cai payload --stack {args.stack} --out payload.json  (uses what was uploaded last)")
    return 0


def payload(args) -> int:
    from cai.deploy import payload as make_payload

    settings = {"batch_size": args.batch_size, "runtime": args.runtime, "max_partitions": args.max_partitions,
                "partitions_per_executor": args.partitions_per_executor, "max_concurrency": args.max_concurrency}
    body, partitions = make_payload(args.stack, args.partition_prefix, args.model_key, args.region, args.profile,
                                    args.bucket, args.result_prefix, settings, args.check)
    with open(args.out, "w") as handle:
        json.dump(body, handle, indent=1)
        handle.write("\n")
    found = "" if partitions is None else f"{partitions} partitions, "
    print(f"{args.out}: {found}from s3://{body['bucket']}/{body['partition_prefix']} with model "
          f"{body['model_key']}; results under {body['result_prefix']}")
    print(f"start it: npx sls invoke stepf --name cai --path {args.out}  (--data takes inline JSON, not a file)")
    return 0
