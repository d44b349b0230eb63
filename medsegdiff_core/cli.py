"""``medsegdiff``: the command line of the core segmenter.

Subcommands: ``synth`` (write the built-in data), ``train`` (centralised training), ``predict``
(ensemble inference on a folder) and ``evaluate`` (Dice/IoU/HD95 of a model on a labelled
folder). Errors a user can cause are printed as one line naming the file or key, exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import MedSegDiffError


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference (defaults: the model's own settings)")
    group.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"])
    group.add_argument("--steps", type=int, help="sampling steps")
    group.add_argument("--ensemble", type=int, help="samples fused per image")
    group.add_argument("--fusion", choices=["staple", "mean", "majority"])
    group.add_argument("--batch-size", type=int, help="images sampled together")
    group.add_argument("--seed", type=int)
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--layout",
        default="generic",
        help="layout of the folder: generic, refuge, ddti, isic (2-D, PNG out) or brats, "
        "volumes (NIfTI/NRRD/DICOM, volumes out); see `medsegdiff data check --help`",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsegdiff", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write the built-in synthetic multi-site fundus data")
    synth.add_argument("--out", type=Path, default=Path("data/synthetic"))
    synth.add_argument("--sites", type=int, default=3)
    synth.add_argument("--size", type=int, default=128, help="image side in px")
    synth.add_argument(
        "--train",
        "--train-slices-per-site",
        dest="train",
        type=int,
        default=40,
        help="training cases (2-D slices, the DP unit) per site",
    )
    synth.add_argument("--val", type=int, default=8, help="validation cases per site")
    synth.add_argument("--test", type=int, default=12, help="test cases per site")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--public",
        action="store_true",
        help="write the public pretraining set instead (OUT/public: --train training and --val "
        "validation cases, disjoint from every site's and in a shifted style; --sites and "
        "--test are not used)",
    )

    train = sub.add_parser("train", help="train centrally from a YAML config")
    train.add_argument("--config", type=Path, required=True)
    train.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys",
    )

    predict = sub.add_parser("predict", help="ensemble inference on a folder of images")
    _add_model_source(predict)
    predict.add_argument("--input", type=Path, required=True, help="the site's folder")
    predict.add_argument("--out", type=Path, required=True)
    _add_inference_options(predict)

    evaluate = sub.add_parser("evaluate", help="Dice/IoU/HD95 of a model on a labelled folder")
    _add_model_source(evaluate)
    evaluate.add_argument("--data", type=Path, required=True, help="a labelled folder")
    evaluate.add_argument("--out", type=Path, help="where predictions and metrics.json go")
    _add_inference_options(evaluate)

    release = sub.add_parser("release", help="create or verify a signed model release")
    release_sub = release.add_subparsers(dest="release_command", required=True)
    verify = release_sub.add_parser("verify", help="check a release's signature and files")
    verify.add_argument("release", type=Path)
    verify.add_argument("--public-key", type=Path, required=True, help="the trusted public key")
    create = release_sub.add_parser("create", help="package a checkpoint as a signed release")
    create.add_argument("--checkpoint", type=Path, required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")
    create.add_argument("--out", type=Path, default=Path("releases"))
    create.add_argument("--card", type=Path, help="JSON with model-card fields to include")
    keygen = release_sub.add_parser("keygen", help="create an Ed25519 signing key pair")
    keygen.add_argument("key", type=Path, help="private key path; the public key gets .pub")

    from .data.check import add_data_parser

    add_data_parser(sub)
    return parser


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint .json (or its folder)")
    source.add_argument("--release", type=Path, help="signed release folder (needs --public-key)")
    parser.add_argument("--public-key", type=Path, help="trusted key that signed the release")
    parser.add_argument(
        "--release-name", help="the release name you expect (with --release; e.g. fundus)"
    )
    parser.add_argument(
        "--allow-older",
        action="store_true",
        help="accept a release older than the newest this site has verified",
    )
    parser.add_argument(
        "--trust-file",
        type=Path,
        help="where the newest verified version of each release is kept "
        "(default: $FEDMEDSEGDIFF_STATE_DIR or ~/.local/state/fedmedsegdiff)",
    )


def _inference_config(args: argparse.Namespace, defaults):
    overrides = {
        "sampler": args.sampler,
        "sampling_steps": args.steps,
        "ensemble": args.ensemble,
        "fusion": args.fusion,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    from .config import InferenceConfig

    merged = defaults.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    return InferenceConfig.model_validate(merged)


def _run_synth(args: argparse.Namespace) -> None:
    from .data.synthetic import write_fundus_sites, write_public_fundus

    if args.public:
        public = write_public_fundus(
            args.out / "public",
            args.train,
            val=args.val,
            size=args.size,
            seed=args.seed,
            progress=not args.quiet,
        )
        print(f"wrote {public}")
        return
    sites = write_fundus_sites(
        args.out,
        num_sites=args.sites,
        cases={"train": args.train, "val": args.val, "test": args.test},
        size=args.size,
        seed=args.seed,
        progress=not args.quiet,
    )
    for site in sites:
        print(f"wrote {site}")


def _run_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .training import fit

    config = load_config(args.config, args.set)
    result = fit(config, progress=not args.quiet)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s; model: {result.checkpoint}")


def _run_predict(args: argparse.Namespace, *, require_masks: bool) -> None:
    from .checkpoint import load_checkpoint
    from .inference import predict_folder
    from .metrics import format_table
    from .training import autocast_dtype, pick_device

    device = pick_device(args.device)
    if args.release is not None:
        from .release import TrustStore, default_trust_path, load_release

        if args.public_key is None:
            raise MedSegDiffError("--release needs --public-key: the key you trust to sign it")
        if not args.release_name:
            raise MedSegDiffError("--release needs --release-name: the release you expect")
        loaded = load_release(
            args.release,
            args.public_key,
            expected_name=args.release_name,
            trust=TrustStore(args.trust_file or default_trust_path()),
            allow_older=args.allow_older,
            device=device,
        )
        card = loaded.metadata["release"]
        print(f"verified release {card['name']} v{card['version']} ({args.release})")
    else:
        loaded = load_checkpoint(args.checkpoint, device=device)
    cfg = _inference_config(args, loaded.inference)
    out_dir = args.out or Path("predictions") / (args.release or args.checkpoint).stem
    folder = args.input if not require_masks else args.data
    report = predict_folder(
        loaded,
        folder,
        out_dir,
        cfg,
        layout=args.layout,
        require_masks=require_masks,  # every case read and checked before any sampling
        device=device,
        amp_dtype=autocast_dtype(device, True, inference=True),
        progress=not args.quiet,
    )
    print(
        f"segmented {report.cases} cases with {cfg.ensemble} {cfg.sampler} samples of "
        f"{cfg.sampling_steps} steps fused by {cfg.fusion}; wrote {out_dir}"
    )
    if report.summary is not None:
        print(format_table(report.rows, report.summary))
        print(json.dumps(report.summary["mean"]))


def _run_release(args: argparse.Namespace) -> None:
    from . import release

    if args.release_command == "verify":
        manifest = release.verify_release(
            args.release, release.load_public_key(args.public_key)
        ).manifest
        print(
            f"OK: {args.release} is {manifest['name']} v{manifest['version']}, "
            f"{len(manifest['files'])} files, signature valid"
        )
    elif args.release_command == "create":
        card = json.loads(args.card.read_text()) if args.card else {}
        path = release.write_release(
            args.checkpoint,
            args.out,
            args.name,
            card,
            release.load_private_key(args.key, release.passphrase_from_env()),
        )
        print(f"released {path}")
    elif args.release_command == "keygen":
        if args.key.exists():
            raise MedSegDiffError(f"{args.key}: already exists; not overwriting a signing key")
        release.generate_signing_key(args.key, release.passphrase_from_env())
        print(f"wrote {args.key} and {release.public_path(args.key)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "synth":
            _run_synth(args)
        elif args.command == "train":
            _run_train(args)
        elif args.command == "predict":
            _run_predict(args, require_masks=False)
        elif args.command == "evaluate":
            _run_predict(args, require_masks=True)
        elif args.command == "release":
            _run_release(args)
        elif args.command == "data":
            from .data.check import run_data_command

            return run_data_command(args)
    except MedSegDiffError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
