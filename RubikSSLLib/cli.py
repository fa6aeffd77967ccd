"""The `rubikssl` command line. Exit codes: 0 ok, 1 internal error, 2 bad input, 3 cancelled."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from pathlib import Path

from RubikSSLLib import __version__
from RubikSSLLib.errors import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_INTERNAL, EXIT_OK, BadInput, Cancelled
from RubikSSLLib.progress import MODES, Reporter

SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data"
TASKS = ("rubik", "rubik+", "rubik++", "jigsaw", "rotation", "rpl", "exemplar", "cpc", "mae", "genesis")  # RubikSSLLib.tasks.REGISTRY (a test keeps them equal)
DISK_ERRORS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


def voxel_triple(text: str) -> tuple[int, int, int]:
    """'32' -> (32, 32, 32); '16,32,32' -> (z, y, x) = (16, 32, 32)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give one integer or three as z,y,x") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: give one integer or three as z,y,x")
    return tuple(values * 3 if len(values) == 1 else values)


def task_spec(text: str) -> str:
    from RubikSSLLib import tasks

    try:
        tasks.parse(text)
    except BadInput as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def spacing(text: str) -> float | None:
    return None if text.lower() in ("native", "none", "0") else float(text)


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cube-size", type=voxel_triple, default=(32, 32, 32), help="voxels, N or z,y,x (default 32)")
    parser.add_argument("--jitter", type=voxel_triple, default=(6, 6, 6), help="max cube offset in its cell; gaps 0..2x (default 6)")
    parser.add_argument("--grid", type=int, default=2, choices=(2, 3), help="cubes per axis (default 2: 2x2x2)")
    parser.add_argument("--permutations", type=int, default=100, help="K, size of the Hamming permutation table")
    parser.add_argument("--spacing", type=spacing, default=2.0, help="resample to this isotropic mm, or 'native' (default 2)")
    parser.add_argument("--intensity", choices=("auto", "ct", "mri", "none"), default="auto",
                        help="CT HU window [-1000, 1000] or MRI 0.5-99.5 percentile clip (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rubikssl", description="Self-supervised pretraining of 3D CNNs on CT/MRI volumes.")
    parser.add_argument("--version", action="version", version=f"rubikssl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain", help="pretrain an encoder on a pretext task (default: Rubik's cube)")
    pretrain.add_argument("--task", type=task_spec, default="rubik", metavar="TASK[,TASK...]",
                          help=f"pretext task: {', '.join(TASKS)} (default rubik), or several on one encoder as "
                               "rubik,mae or with loss weights rubik=1,mae=0.5; jigsaw takes --grid 2|3")
    pretrain.add_argument("--data", nargs="+", required=True, help="volume files, folders, datalist .json, nnU-Net folder, .npz")
    pretrain.add_argument("--out", required=True, help="run folder (checkpoints, model, metrics)")
    pretrain.add_argument("--steps", type=int, default=2000)
    pretrain.add_argument("--batch-size", type=int, default=8, help="puzzles per step")
    pretrain.add_argument("--learning-rate", type=float, default=1e-3)
    pretrain.add_argument("--eval-every", type=int, default=250, help="steps between validation + checkpoint")
    pretrain.add_argument("--val-puzzles", type=int, default=128)
    pretrain.add_argument("--widths", type=lambda s: tuple(int(v) for v in s.split(",")), default=(16, 32, 64, 128))
    pretrain.add_argument("--norm", choices=("batch", "instance", "group"), default="batch")
    pretrain.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: 0 on CPU, 4 on CUDA)")
    pretrain.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    pretrain.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    pretrain.add_argument("--skip-unusable", action="store_true",
                          help="leave out (and report) volumes that cannot be used instead of stopping")
    add_common(pretrain)
    add_data_options(pretrain)
    pretrain.set_defaults(handler=run_pretrain)

    puzzle = commands.add_parser("puzzle", help="scramble a volume (and solve it with a model) for viewing")
    puzzle.add_argument("--volume", nargs="+", required=True, help="the channel files of one case")
    puzzle.add_argument("--out", required=True, help="output folder")
    puzzle.add_argument("--model", help="a pretraining run folder: also record its solution")
    puzzle.add_argument("--task", choices=TASKS, default="rubik",
                        help="show this pretext task's sample (tasks other than rubik, rubik+, jigsaw: input and target volumes)")
    puzzle.add_argument("--seed", type=int, default=0)
    puzzle.add_argument("--progress", choices=MODES, default="bar")
    add_data_options(puzzle)
    puzzle.set_defaults(handler=run_puzzle)

    finetune = commands.add_parser("finetune", help="fine-tune a pretrained (or random) encoder on labelled data")
    finetune.add_argument("--task", choices=("classify", "segment"), required=True)
    finetune.add_argument("--train", nargs="+", required=True, help="datalist .json, .npz archive or nnU-Net folder")
    finetune.add_argument("--val", nargs="+", required=True, help="the same kinds; a datalist gives its 'validation' list")
    finetune.add_argument("--out", required=True, help="run folder")
    finetune.add_argument("--init", default="scratch", help="a pretraining run folder, or 'scratch'")
    finetune.add_argument("--label-fraction", type=float, default=1.0, help="use this fraction of the training cases")
    finetune.add_argument("--decoder", choices=("unet", "duc"), default="unet")
    finetune.add_argument("--freeze-epochs", type=int, default=0, help="epochs with a frozen encoder before full fine-tuning")
    finetune.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up, in epochs")
    finetune.add_argument("--encoder-lr-factor", type=float, default=1.0,
                          help="the encoder's learning rate relative to --learning-rate (e.g. 0.1)")
    finetune.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                          help="after the warm-up: constant, or a cosine decay to 0 at the last epoch")
    finetune.add_argument("--no-bn-recalibration", dest="recalibrate_bn", action="store_false",
                          help="keep the pretrained BatchNorm statistics instead of re-estimating them on the target data")
    finetune.add_argument("--epochs", type=int, default=20)
    finetune.add_argument("--batch-size", type=int, default=8)
    finetune.add_argument("--learning-rate", type=float, default=3e-4)
    finetune.add_argument("--patch-size", type=voxel_triple, default=(64, 64, 64), help="segmentation patch / classification input")
    finetune.add_argument("--iterations-per-epoch", type=int, default=0)
    finetune.add_argument("--spacing", type=spacing, default=None, help="isotropic mm, or native (default)")
    finetune.add_argument("--intensity", choices=("auto", "ct", "mri", "none"), default="auto")
    finetune.add_argument("--widths", type=lambda s: tuple(int(v) for v in s.split(",")), default=(16, 32, 64, 128),
                          help="encoder widths for --init scratch (a pretrained run brings its own)")
    finetune.add_argument("--resume", action="store_true")
    add_common(finetune)
    finetune.set_defaults(handler=run_finetune)

    evaluate = commands.add_parser("evaluate", parents=[finetune], add_help=False, conflict_handler="resolve",
                                   help="scratch vs pretrained at several label fractions x paired seeds")
    evaluate.add_argument("--fractions", type=lambda s: [float(v) for v in s.split(",")], default=[0.1, 0.25, 1.0])
    evaluate.add_argument("--seeds", type=int, default=5, help="paired seeds 0 .. N-1 (5 or more for any claim)")
    evaluate.add_argument("--last-epochs", type=int, default=3, help="a run's score: mean of its last N epochs")
    evaluate.set_defaults(handler=run_evaluate)

    segment = commands.add_parser("segment", help="segment a volume with a fine-tuned model -> .seg.nrrd")
    segment.add_argument("--model", required=True, help="a fine-tuning run folder")
    segment.add_argument("--volume", nargs="+", required=True, help="the channel files of one case")
    segment.add_argument("--out", required=True, help="result.seg.nrrd (a .labels.nrrd labelmap is written beside it)")
    segment.add_argument("--progress", choices=MODES, default="bar")
    segment.set_defaults(handler=run_segment)

    classify = commands.add_parser("classify", help="classify a volume with a fine-tuned model -> JSON")
    classify.add_argument("--model", required=True)
    classify.add_argument("--volume", nargs="+", required=True)
    classify.add_argument("--out", required=True, help="result.json")
    classify.add_argument("--progress", choices=MODES, default="bar")
    classify.set_defaults(handler=run_classify)

    probe = commands.add_parser("probe", help="print versions and devices as JSON")
    probe.set_defaults(handler=run_probe, progress="none")

    demo = commands.add_parser("demo", help="pretrain, solve a puzzle, fine-tune and segment, all on the bundled sample data")
    demo.add_argument("--out", default="rubikssl-demo", help="output folder (default ./rubikssl-demo)")
    demo.add_argument("--steps", type=int, default=600, help="pretraining steps")
    demo.add_argument("--finetune-epochs", type=int, default=12)
    add_common(demo)
    demo.set_defaults(handler=run_demo)
    return parser


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--progress", choices=MODES, default="bar", help="bar (people), json (programs), none")


def data_settings(args: argparse.Namespace) -> dict:
    """The PretrainConfig fields that shape the puzzle and the preprocessing."""
    from RubikSSLLib.intensity import IntensityRecipe
    from RubikSSLLib.puzzle import PuzzleSpec

    return {"puzzle": PuzzleSpec(args.grid, args.cube_size, args.jitter, args.permutations),
            "intensity": IntensityRecipe(args.intensity), "spacing_mm": args.spacing}


def pretrain_config(args: argparse.Namespace):
    from RubikSSLLib import datasources
    from RubikSSLLib.config import PretrainConfig
    from RubikSSLLib.networks import EncoderConfig

    in_channels = len(datasources.resolve(args.data).train[0].channels)
    return PretrainConfig(
        data=list(args.data), out=args.out, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, eval_every=args.eval_every, val_puzzles=args.val_puzzles,
        encoder=EncoderConfig(in_channels, args.widths, (1,) + (2,) * (len(args.widths) - 1), args.norm),
        seed=args.seed, device=args.device, precision=args.precision, workers=args.workers,
        skip_unusable=args.skip_unusable, task=args.task, **data_settings(args),
    )


def run_pretrain(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import rundir, training
    from RubikSSLLib.config import PretrainConfig

    stored = Path(args.out) / rundir.CONFIG
    if args.resume and stored.exists():
        config = PretrainConfig.read(stored)  # the run's own settings; only the budget and the device may change
        config.steps, config.device, config.workers = args.steps, args.device, args.workers
    else:
        config = pretrain_config(args)
    metrics = training.Pretraining(config, reporter, resume=args.resume).run()
    reporter.done("ok", EXIT_OK, **metrics)
    return EXIT_OK


def run_puzzle(args: argparse.Namespace, reporter: Reporter) -> int:
    import numpy as np

    from RubikSSLLib import puzzle, puzzleview, tasks, training
    from RubikSSLLib.config import PretrainConfig

    model = None
    if args.model:
        model, card = training.load_pretrained(args.model)
        config = PretrainConfig.from_json(card["config"])
        if "permutations" not in card:
            raise BadInput(f"{args.model}: a {config.task} model solves no puzzle; give a rubik or jigsaw run, or use --task")
        table = np.array(card["permutations"], dtype=np.int64)
    else:
        config = PretrainConfig(data=list(args.volume), out=args.out, task=args.task, **data_settings(args))
        if config.task not in tasks.PUZZLE_TASKS:
            record = puzzleview.write_task_sample(list(args.volume), Path(args.out), config, args.seed)
            for kind, name in puzzleview.TASK_OUTPUTS.items():
                if (Path(args.out) / name).exists():
                    reporter.artifact(str(Path(args.out) / name), kind)
            reporter.done("ok", EXIT_OK, task=config.task)
            return EXIT_OK
        spec = config.puzzle
        table = puzzle.permutation_table(spec.num_cubes, spec.num_permutations, spec.permutation_seed)
    record = puzzleview.write_puzzle(list(args.volume), Path(args.out), config, table, args.seed, model)
    for kind, name in puzzleview.OUTPUTS.items():
        reporter.artifact(str(Path(args.out) / name), kind)
    summary = {"permutation_index": record["permutation_index"]}
    if "prediction" in record:
        prediction = record["prediction"]
        summary.update(order_correct=prediction["order_correct"],
                       cubes_placed_correctly=sum(prediction["cube_placed_correctly"]),
                       cubes_oriented_correctly=sum(prediction["cube_oriented_correctly"]))
    reporter.log(f"wrote {args.out}: " + json.dumps(summary))
    reporter.done("ok", EXIT_OK, **summary)
    return EXIT_OK


def finetune_config(args: argparse.Namespace):
    """A FinetuneConfig from the finetune options; a pretrained --init brings its own encoder widths."""
    from RubikSSLLib import checkpoint, finetune, labeled, transfer
    from RubikSSLLib.intensity import IntensityRecipe
    from RubikSSLLib.networks import EncoderConfig

    first = labeled.resolve(args.train[0], "train").cases
    channels = len(first[0].image.channels) if first and not first[0].image.npz_key else 1
    encoder = EncoderConfig(channels, args.widths, (1,) + (2,) * (len(args.widths) - 1))
    if args.init != "scratch":
        pretrained = checkpoint.load_model(transfer.pretrained_model_file(args.init))[1]["config"]["encoder"]
        encoder = EncoderConfig(channels, tuple(pretrained["widths"]), tuple(pretrained["depths"]), pretrained["norm"])
    return finetune.FinetuneConfig(
        task=args.task, train=list(args.train), val=list(args.val), out=args.out, init=args.init,
        label_fraction=args.label_fraction, decoder=args.decoder, freeze_epochs=args.freeze_epochs, epochs=args.epochs,
        warmup_epochs=args.warmup_epochs, encoder_lr_factor=args.encoder_lr_factor, recalibrate_bn=args.recalibrate_bn,
        lr_schedule=args.lr_schedule,
        batch_size=args.batch_size, learning_rate=args.learning_rate, patch_size=args.patch_size,
        iterations_per_epoch=args.iterations_per_epoch, spacing_mm=args.spacing,
        intensity=IntensityRecipe(args.intensity), encoder=encoder, seed=args.seed, device=args.device,
    )


def run_finetune(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import finetune, rundir

    stored = Path(args.out) / rundir.CONFIG
    if args.resume and stored.exists():
        config = finetune.FinetuneConfig.from_json(json.loads(stored.read_text(encoding="utf-8")))
        config.epochs, config.device = args.epochs, args.device  # the run's own settings; budget and device may change
    else:
        config = finetune_config(args)
    metrics = finetune.Finetuning(config, reporter, resume=args.resume).run()
    reporter.done("ok", EXIT_OK, **metrics)
    return EXIT_OK


def run_evaluate(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import evaluate

    if args.init == "scratch":
        raise BadInput("--init must name a pretraining run folder: evaluate compares it with training from scratch")
    base = finetune_config(argparse.Namespace(**{**vars(args), "out": str(Path(args.out) / "runs")}))
    summary = evaluate.run_evaluation(base, args.init, args.fractions, list(range(args.seeds)), Path(args.out), reporter,
                                      args.last_epochs)
    reporter.log((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    reporter.artifact(str(Path(args.out) / "results.md"), "table")
    reporter.artifact(str(Path(args.out) / "results.png"), "plot")
    reporter.done("ok", EXIT_OK, summary=summary)
    return EXIT_OK


def run_segment(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import predict

    summary = predict.segment(args.model, list(args.volume), args.out)
    reporter.artifact(summary["segmentation"], "segmentation")
    reporter.artifact(summary["labelmap"], "labelmap")
    reporter.log(f"wrote {summary['segmentation']}: voxels per segment {json.dumps(summary['voxels'])}")
    reporter.done("ok", EXIT_OK, **summary)
    return EXIT_OK


def run_classify(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import predict

    result = predict.classify(args.model, list(args.volume), args.out)
    reporter.artifact(args.out, "classification")
    reporter.log(f"{result['predicted']}: " + json.dumps(result["probabilities"]))
    reporter.done("ok", EXIT_OK, predicted=result["predicted"], probabilities=result["probabilities"])
    return EXIT_OK


def run_probe(args: argparse.Namespace, reporter: Reporter) -> int:
    import torch

    from RubikSSLLib.training import versions

    devices = [{"type": "cpu", "threads": torch.get_num_threads(), "cores": os.cpu_count()}]
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        devices.append({"type": "cuda", "index": index, "name": properties.name,
                        "memory_gib": round(properties.total_memory / 2**30, 2)})
    print(json.dumps({"versions": versions(), "cuda_available": torch.cuda.is_available(), "devices": devices}))
    return EXIT_OK


def run_demo(args: argparse.Namespace, reporter: Reporter) -> int:
    """The whole product on the bundled data, on CPU in minutes: pretrain, solve a puzzle, fine-tune, segment.

    Pretraining uses the unlabeled bundled brain MRIs. Fine-tuning uses the one bundled labelled case (a chronic
    stroke lesion) for training AND validation, so its Dice shows the mechanics, not a generalisation score; the
    segmentation is then run on a different, unlabelled stroke scan. Every stage resumes if run again.
    """
    from RubikSSLLib import checkpoint, rundir
    from RubikSSLLib.files import write_json_atomic

    volumes = sorted(str(p) for p in SAMPLE_DATA.glob("*.nii.gz"))
    labelled_image, lesion = SAMPLE_DATA / "stroke_T2.nii.gz", SAMPLE_DATA / "labels" / "stroke_T2_lesion.nii.gz"
    if not volumes or not lesion.exists():
        raise BadInput(f"{SAMPLE_DATA}: the bundled sample volumes are missing; reinstall rubikssl")
    out = Path(args.out)
    common = ["--seed", str(args.seed), "--progress", args.progress, "--device", args.device]

    def stage(command: list[str], run: Path, handler) -> None:
        resume = ["--resume"] if (run / rundir.CONFIG).exists() else []
        handler(build_parser().parse_args([*command, *common, *resume]), reporter)

    reporter.log("1/4 pretraining on the bundled unlabeled brain MRI")
    pretrain = out / "pretrain"
    stage(["pretrain", "--data", *volumes, "--out", str(pretrain), "--steps", str(args.steps),
           "--eval-every", str(max(1, args.steps // 4))], pretrain, run_pretrain)

    reporter.log("2/4 scrambling a held-out volume and solving it")
    held_out = checkpoint.load_model(pretrain / rundir.BEST_MODEL)[1]["data"]["validation"][0]["channels"][0]["path"]
    run_puzzle(build_parser().parse_args(["puzzle", "--volume", held_out, "--out", str(out / "puzzle"),
                                          "--model", str(pretrain), "--seed", str(args.seed),
                                          "--progress", args.progress]), reporter)

    reporter.log("3/4 fine-tuning a U-Net on the bundled stroke lesion from the pretrained encoder")
    datalist = out / "lesion_datalist.json"
    case = {"image": str(labelled_image), "label": str(lesion)}
    write_json_atomic(datalist, {"labels": {"1": "stroke lesion"}, "training": [case], "validation": [case]})
    finetuned = out / "finetune"
    stage(["finetune", "--task", "segment", "--train", str(datalist), "--val", str(datalist), "--out", str(finetuned),
           "--init", str(pretrain), "--spacing", "2", "--patch-size", "48", "--batch-size", "2",
           "--epochs", str(args.finetune_epochs), "--iterations-per-epoch", "8"], finetuned, run_finetune)

    reporter.log("4/4 segmenting another (unlabelled) stroke scan")
    unseen = SAMPLE_DATA / "t2lesion_M2265_T2w.nii.gz"
    return run_segment(build_parser().parse_args(
        ["segment", "--model", str(finetuned), "--volume", str(unseen), "--out", str(out / "segment" / "M2265.seg.nrrd"),
         "--progress", args.progress]), reporter)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reporter = Reporter(args.progress, enabled=os.environ.get("RANK", "0") == "0")  # torchrun: rank 0 speaks
    try:
        return args.handler(args, reporter)
    except BadInput as error:
        return fail(reporter, str(error), EXIT_BAD_INPUT)
    except Cancelled as error:
        print(f"rubikssl: cancelled: {error}", file=sys.stderr)
        reporter.done("cancelled", EXIT_CANCELLED, message=str(error))
        return EXIT_CANCELLED
    except OSError as error:
        if error.errno in DISK_ERRORS:
            return fail(reporter, f"{error.filename or 'output'}: {error.strerror}; free disk space or choose a writable --out", EXIT_BAD_INPUT)
        traceback.print_exc()
        return fail(reporter, f"internal error: {error}", EXIT_INTERNAL)
    except Exception as error:  # noqa: BLE001 - the last line of defence prints the traceback
        traceback.print_exc()
        return fail(reporter, f"internal error: {type(error).__name__}: {error}", EXIT_INTERNAL)


def fail(reporter: Reporter, message: str, code: int) -> int:
    message = " ".join(message.split())
    print(f"rubikssl: error: {message}", file=sys.stderr)
    reporter.error(message, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
