"""``python -m preprocessing <command>``: dataset tools.

Commands (each has ``--help``; preprocessing/README.md has examples):

* ``convert``    ImageNet-style folder / tar / zip -> uint8 image shards + labels + manifest + skip report
* ``encode``     add latents (``invae`` or ``identity``) beside the images of a shard dataset
* ``reference``  ADM-format reference batch (.npz: arr_0 + statistics) from a held-out folder or split
* ``invae-convert-checkpoint``  a pickled INVAE ``.pt`` -> ``.safetensors`` (weights-only unpickling)
* ``verify``     check every sha256 of a shard dataset
* ``digits``     build the digits track dataset (same as ``python -m preprocessing.digits``)
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preprocessing", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from preprocessing import convert, encode, invae, reference

    p = sub.add_parser("convert", help="image folder/tar/zip -> uint8 image shards",
                       description=convert.__doc__.split("\n\n")[0])
    convert.add_arguments(p)
    p.set_defaults(run=convert.main_args)

    p = sub.add_parser("encode", help="add latents to a shard dataset", description=encode.__doc__.split("\n\n")[0])
    encode.add_arguments(p)
    p.set_defaults(run=encode.main_args)

    p = sub.add_parser("reference", help="ADM reference batch (.npz) from a held-out folder or split",
                       description=reference.__doc__.split("\n\n")[0])
    reference.add_arguments(p)
    p.set_defaults(run=reference.main_args)

    p = sub.add_parser("invae-convert-checkpoint", help="INVAE .pt -> .safetensors (weights-only load)")
    invae.add_convert_arguments(p)
    p.set_defaults(run=invae.convert_main_args)

    p = sub.add_parser("verify", help="check every sha256 of a shard dataset")
    p.add_argument("root", help="dataset folder")
    p.set_defaults(run=_verify)

    p = sub.add_parser("digits", help="build the digits track dataset")
    p.add_argument("--out", default=None)
    p.add_argument("--force", action="store_true")
    p.set_defaults(run=_digits)

    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; completed work is kept and the command resumes where it stopped", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _verify(args) -> int:
    from preprocessing.shards import verify_dataset

    manifest = verify_dataset(args.root)
    counts = {s: r["count"] for s, r in manifest["splits"].items()}
    print(f"{args.root}: ok ({manifest['name']}, splits {counts}, latents: {manifest['latent_encoder']})")
    return 0


def _digits(args) -> int:
    from preprocessing import digits

    argv = (["--out", args.out] if args.out else []) + (["--force"] if args.force else [])
    return digits.main(argv)


if __name__ == "__main__":
    sys.exit(main())
