"""The `rubikssl` command line. Exit codes: 0 ok, 1 internal error, 2 bad input, 3 cancelled."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import RubikSSLLib
from RubikSSLLib import hugepages

hugepages.request()  # before anything imports torch: the commands' processes allocate on huge pages

from RubikSSLLib import __version__, stopping  # noqa: E402
from RubikSSLLib.errors import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_INTERNAL, EXIT_OK, BadInput, Cancelled  # noqa: E402
from RubikSSLLib.files import real_name, write_refusal  # noqa: E402
from RubikSSLLib.progress import MODES, Reporter  # noqa: E402

SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data"
STOP_FILE_VARIABLE = "RUBIKSSL_STOP_FILE"  # jobs.STOP_FILE_VARIABLE (not imported: jobs is the panel's side)
REQUIRED = {"serve": ("model",), "rank": ("model", "data", "out"), "pretrain": ("data", "out"), "puzzle": ("volume", "out"), "finetune": ("task", "train", "val", "out"),
            "segment": ("model", "volume", "out"), "classify": ("model", "volume", "out")}


def build_parser() -> argparse.ArgumentParser:
    """Every command's options come from its config dataclass (RubikSSLLib.config); only the run-control flags
    (--resume, --progress) and the demo's are written here."""
    from RubikSSLLib import config, options

    parser = argparse.ArgumentParser(prog="rubikssl", description="Self-supervised pretraining of 3D CNNs on CT/MRI volumes.")
    parser.add_argument("--version", action="version", version=f"rubikssl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, handler, *configs: type, resume: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        for cls in configs:
            options.add_options(sub, cls, required=REQUIRED.get(name, REQUIRED["finetune"]))
        if resume:
            sub.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        sub.add_argument("--progress", choices=MODES, default="bar", help="bar (people), json (programs), none")
        sub.set_defaults(handler=handler)
        return sub

    command("pretrain", "pretrain an encoder on a pretext task (default: Rubik's cube)", run_pretrain,
            config.PretrainConfig, resume=True)
    command("puzzle", "scramble a volume (and solve it with a model) for viewing", run_puzzle, config.PuzzleConfig)
    command("finetune", "fine-tune a pretrained (or random) encoder on labelled data", run_finetune,
            config.FinetuneConfig, resume=True)
    command("evaluate", "scratch vs pretrained at several label fractions x paired seeds", run_evaluate,
            config.FinetuneConfig, config.EvaluateConfig)
    command("segment", "segment a volume with a fine-tuned model -> .seg.nrrd (+ .labels.nrrd)", run_segment,
            config.SegmentConfig)
    command("classify", "classify a volume with a fine-tuned model -> JSON", run_classify, config.ClassifyConfig)
    command("serve", "answer segmentation requests (clicks) one JSON line at a time, model loaded once", run_serve,
            config.ServeConfig)
    command("rank", "rank unlabelled volumes by the model's uncertainty: which case to correct first", run_rank,
            config.RankConfig)

    export = commands.add_parser("export-nnunet", help="an nnU-Net pretraining's weights as nnUNetv2_train "
                                 "-pretrained_weights loads them")
    export.add_argument("run", help="a run folder (or model file) of rubikssl pretrain --network nnunet")
    export.add_argument("--out", required=True, help="the checkpoint to write, e.g. pretrained.pth")
    export.add_argument("--progress", choices=MODES, default="bar", help="bar (people), json (programs), none")
    export.set_defaults(handler=run_export_nnunet)

    probe = commands.add_parser("probe", help="print versions and devices as JSON")
    probe.set_defaults(handler=run_probe, progress="none")

    demo = commands.add_parser("demo", help="pretrain, solve a puzzle, fine-tune and segment, all on the bundled sample data")
    demo.add_argument("--out", default="rubikssl-demo", help="output folder (default ./rubikssl-demo)")
    demo.add_argument("--steps", type=int, default=600, help="pretraining steps")
    demo.add_argument("--finetune-epochs", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", help=config.DEVICES)
    demo.add_argument("--progress", choices=MODES, default="bar", help="bar (people), json (programs), none")
    demo.set_defaults(handler=run_demo)
    return parser


def given(args: argparse.Namespace) -> dict:
    from RubikSSLLib import options

    return options.given(args)


def resumed(cls, out: str, values: dict, changeable: tuple[str, ...]):
    """The run's own stored config, with only the budget and the device changed. The folder the user names is
    the run, wherever it was first written: a moved or copied run resumes, locks and writes here."""
    import dataclasses

    from RubikSSLLib import rundir

    stored = cls.read(Path(out) / rundir.CONFIG)
    return dataclasses.replace(stored, out=out, **{name: values[name] for name in changeable if name in values})


def run_pretrain(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import datasources, rundir, training
    from RubikSSLLib.config import PretrainConfig

    values = given(args)
    if args.resume and (Path(args.out) / rundir.CONFIG).exists():
        config = resumed(PretrainConfig, args.out, values, ("steps", "device", "workers"))
    else:
        channels = len(datasources.resolve(values["data"]).train[0].channels)
        values.setdefault("encoder", {})["in_channels"] = channels
        if values.get("network") == "nnunet":
            values.update(nnunet_settings(values, channels))
        config = PretrainConfig.from_values(values)
    metrics = training.Pretraining(config, reporter, resume=args.resume).run()
    reporter.done("ok", EXIT_OK, **metrics)
    return EXIT_OK


def nnunet_settings(values: dict, channels: int) -> dict:
    """--network nnunet: the plan the run keeps (the plans and their dataset.json), nnU-Net's own normalisation
    instead of an intensity recipe, refused in one line where the data cannot feed the plan's network."""
    from RubikSSLLib import nnunet

    nnunet.require()
    if not values.get("plans"):
        raise BadInput("--network nnunet needs --plans nnUNetPlans.json (nnU-Net's planning writes it into "
                       "nnUNet_preprocessed/DatasetXXX_Name/)")
    if "intensity" in values:
        raise BadInput("--intensity: nnU-Net's network reads what its plans' normalisation gives; leave --intensity out")
    record = nnunet.read_plans(values["plans"], values.get("configuration", "3d_fullres"))
    plan = nnunet.plan_of(record)
    if plan.input_channels != channels:
        raise BadInput(f"--data: {channels} channel file(s) per case, but the plan's dataset has {plan.input_channels} "
                       f"channels ({', '.join(plan.dataset.get('channel_names', {}).values())}); give a datalist whose "
                       "cases list every channel, in the plan's order")
    return {"nnunet": record, "intensity": {"kind": "preprocessed"}}


def run_export_nnunet(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import checkpoint, nnunet, transfer

    path = transfer.pretrained_model_file(args.run)
    state, card = checkpoint.load_model(path, "rubikssl pretrain --network nnunet")
    summary = nnunet.export(state, card, args.out)
    reporter.artifact(summary["out"], "nnunet_weights")
    reporter.log(f"wrote {summary['out']}: {summary['pretrained']} tensors pretrained, {summary['nnunet_init']} "
                 f"nnU-Net's fresh initialisation (not pretrained), {summary['segmentation_layers']} segmentation layers "
                 f"(nnU-Net does not load them); fine-tune with nnUNetv2_train DATASET {summary['configuration']} FOLD "
                 f"-pretrained_weights {summary['out']}")
    reporter.done("ok", EXIT_OK, **summary)
    return EXIT_OK


def run_puzzle(args: argparse.Namespace, reporter: Reporter) -> int:
    import numpy as np

    from RubikSSLLib import puzzle, puzzleview, taskspec, training
    from RubikSSLLib.config import PretrainConfig, PuzzleConfig
    from RubikSSLLib.files import atomic_folder

    settings = PuzzleConfig.from_values(given(args))
    out, model = Path(settings.out), None
    if settings.model:
        model, card = training.load_pretrained(settings.model)
        config = PretrainConfig.from_json(card["config"])
        if "permutations" not in card:
            raise BadInput(f"{settings.model}: a {config.task} model solves no puzzle; give a rubik or jigsaw run, or use --task")
        table = np.array(card["permutations"], dtype=np.int64)
    else:
        config = settings.pretraining()
        if config.task not in taskspec.PUZZLE_TASKS:
            with atomic_folder(out, last=puzzleview.TASK_OUTPUTS["sample"]) as folder:  # the set, or nothing
                puzzleview.write_task_sample(list(settings.volume), folder, config, settings.seed)
            for kind, name in puzzleview.TASK_OUTPUTS.items():
                if (out / name).exists():
                    reporter.artifact(str(out / name), kind)
            reporter.done("ok", EXIT_OK, task=config.task)
            return EXIT_OK
        spec = config.puzzle
        table = puzzle.permutation_table(spec.num_cubes, spec.num_permutations, spec.permutation_seed)
    with atomic_folder(out, last=puzzleview.OUTPUTS["puzzle"]) as folder:  # the set, or nothing
        record = puzzleview.write_puzzle(list(settings.volume), folder, config, table, settings.seed, model)
    for kind, name in puzzleview.OUTPUTS.items():
        reporter.artifact(str(out / name), kind)
    summary = {"permutation_index": record["permutation_index"]}
    if "prediction" in record:
        prediction = record["prediction"]
        summary.update(order_correct=prediction["order_correct"],
                       cubes_placed_correctly=sum(prediction["cube_placed_correctly"]),
                       cubes_oriented_correctly=sum(prediction["cube_oriented_correctly"]))
    reporter.log(f"wrote {out}: " + json.dumps(summary))
    reporter.done("ok", EXIT_OK, **summary)
    return EXIT_OK


def finetune_config(values: dict, reporter: Reporter | None = None):
    """A FinetuneConfig from option values; a pretrained --init brings its own encoder widths, depths and norm
    (read from its model card's header, not its weights); spacing, patch and batch size the user left unset are
    planned from the training data (planning.py) and the plan is logged."""
    from RubikSSLLib import checkpoint, finetune, labeled, planning, transfer
    from RubikSSLLib.config import EncoderConfig, FinetuneConfig, settings_from_json
    from RubikSSLLib.options import build

    first = labeled.resolve(values["train"][0], "train").cases
    channels = len(first[0].image.channels) if first and not first[0].image.npz_key else 1
    encoder = values.setdefault("encoder", {})
    encoder["in_channels"] = channels
    if values.get("init", "scratch") != "scratch":
        path = transfer.pretrained_model_file(values["init"])
        card = checkpoint.read_card(path)
        if isinstance(card.get("config"), dict) and card["config"].get("network") == "nnunet":
            raise BadInput(f"{path}: pretrained nnU-Net's network, which nnU-Net fine-tunes: rubikssl export-nnunet "
                           f"{values['init']} --out pretrained.pth, then nnUNetv2_train DATASET CONFIGURATION FOLD "
                           "-pretrained_weights pretrained.pth")
        try:
            pretrained = settings_from_json(EncoderConfig, card["config"]["encoder"])
        except BadInput as error:
            raise BadInput(f"{path}: its model card holds an invalid encoder setting ({str(error).replace('--', '')}); "
                           "the file is damaged or not RubikSSL's: point --init to a run of rubikssl pretrain") from None
        except (KeyError, TypeError) as error:
            raise BadInput(f"{path}: its model card has no encoder settings ({error}); point --init to a run of "
                           "rubikssl pretrain") from None
        encoder.update(widths=pretrained.widths, depths=pretrained.depths, norm=pretrained.norm)
    if values.get("resume_from"):
        values.update(inherited_settings(values["resume_from"], values["task"]))
    base = FinetuneConfig(task=values["task"], train=list(values["train"]), val=list(values["val"]), out=values["out"])
    if not {"spacing_mm", "patch_size", "batch_size"} <= set(values):
        device = values.get("device", "auto")
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        values["plan"] = planning.plan(values, finetune.gather(values["train"], "train").cases,
                                       EncoderConfig(**encoder), device)
        if reporter is not None:
            reporter.log(planning.describe(values["plan"]))
    return build(FinetuneConfig, values, base)


def inherited_settings(model: str, task: str) -> dict:
    """What continuing a fine-tuned model keeps from it (--resume-from): its network and its preprocessing."""
    from RubikSSLLib import checkpoint, transfer

    path = transfer.pretrained_model_file(model)
    card = checkpoint.read_card(path)
    stored = card.get("config") if isinstance(card.get("config"), dict) else {}
    if card.get("task") != task or "encoder" not in stored:
        raise BadInput(f"{path}: is not a fine-tuned {task!r} model; --resume-from takes a run of rubikssl finetune "
                       f"--task {task}")
    kept = ("encoder", "decoder", "interactive", "spacing_mm", "patch_size", "intensity", "canonical_orientation")
    return {name: stored[name] for name in kept if name in stored}


def run_finetune(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import finetune, rundir
    from RubikSSLLib.config import FinetuneConfig

    values = given(args)
    if args.resume and (Path(args.out) / rundir.CONFIG).exists():
        config = resumed(FinetuneConfig, args.out, values, ("epochs", "device"))
    else:
        config = finetune_config(values, reporter)
    metrics = finetune.Finetuning(config, reporter, resume=args.resume).run()
    reporter.done("ok", EXIT_OK, **metrics)
    return EXIT_OK


def run_evaluate(args: argparse.Namespace, reporter: Reporter) -> int:
    import dataclasses

    from RubikSSLLib import evaluate
    from RubikSSLLib.config import EvaluateConfig
    from RubikSSLLib.options import build

    values = given(args)
    settings = build(EvaluateConfig, {f.name: values.pop(f.name) for f in dataclasses.fields(EvaluateConfig)
                                      if f.name in values})
    if values.get("init", "scratch") == "scratch":
        raise BadInput("--init must name a pretraining run folder: evaluate compares it with training from scratch")
    out = Path(values["out"])
    base = finetune_config({**values, "out": str(out / "runs")}, reporter)
    summary = evaluate.run_evaluation(base, values["init"], settings.fractions, list(range(settings.seeds)), out,
                                      reporter, settings.last_epochs, settings.test, settings.resamples)
    reporter.log((out / "results.md").read_text(encoding="utf-8"))
    reporter.artifact(str(out / "results.md"), "table")
    reporter.artifact(str(out / "results.png"), "plot")
    reporter.done("ok", EXIT_OK, summary=summary)
    return EXIT_OK


def run_segment(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import clicks, predict
    from RubikSSLLib.config import SegmentConfig
    from RubikSSLLib.options import build

    settings = build(SegmentConfig, given(args))
    points = (clicks.read(settings.clicks) if settings.clicks else []) + \
        (clicks.read(settings.exclude_clicks, include=False) if settings.exclude_clicks else [])
    summary = predict.segment(settings.model, list(settings.volume), settings.out, device=settings.device,
                              largest_component=settings.largest_component, given_clicks=points)
    reporter.artifact(summary["segmentation"], "segmentation")
    reporter.artifact(summary["labelmap"], "labelmap")
    reporter.log(f"wrote {summary['segmentation']}: voxels per segment {json.dumps(summary['voxels'])}")
    reporter.done("ok", EXIT_OK, **summary)
    return EXIT_OK


def run_classify(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import predict
    from RubikSSLLib.config import ClassifyConfig
    from RubikSSLLib.options import build

    settings = build(ClassifyConfig, given(args))
    result = predict.classify(settings.model, list(settings.volume), settings.out, device=settings.device)
    reporter.artifact(settings.out, "classification")
    reporter.log(f"{result['predicted']}: " + json.dumps(result["probabilities"]))
    reporter.done("ok", EXIT_OK, predicted=result["predicted"], probabilities=result["probabilities"])
    return EXIT_OK


def run_serve(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import serve
    from RubikSSLLib.config import ServeConfig
    from RubikSSLLib.options import build

    settings = build(ServeConfig, given(args))
    serve.watch_parent(os.getppid())
    return serve.serve(settings.model, settings.device)


def run_rank(args: argparse.Namespace, reporter: Reporter) -> int:
    from RubikSSLLib import ranking
    from RubikSSLLib.config import RankConfig
    from RubikSSLLib.options import build

    settings = build(RankConfig, given(args))
    ranked = ranking.rank(settings.model, settings.data, settings.out, settings.device, reporter)
    reporter.log(ranking.table(ranked))
    reporter.artifact(settings.out, "ranking")
    reporter.done("ok", EXIT_OK, ranking=ranked)
    return EXIT_OK


def run_probe(args: argparse.Namespace, reporter: Reporter) -> int:
    import torch

    from RubikSSLLib.runloop import versions

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
    stopping.begin()
    RubikSSLLib.STARTED_AT = stopping.launch_time()  # a STOP file older than this command is a stale one
    with stopping.cancel_on_signal():  # from here on a cancel is recorded, whatever code it interrupts
        try:
            args = build_parser().parse_args(argv)
            stopping.check()  # asked before the command began
        except Cancelled as error:
            print(f"rubikssl: cancelled: {error}", file=sys.stderr)
            return EXIT_CANCELLED
        reporter = Reporter(args.progress, enabled=os.environ.get("RANK", "0") == "0")  # torchrun: rank 0 speaks
        watch = stopping.watch_stop_file(os.environ[STOP_FILE_VARIABLE]) if os.environ.get(STOP_FILE_VARIABLE) else None
        try:
            with warnings.catch_warnings():
                warnings.showwarning = lambda message, category, *rest: reporter.log(f"warning: {message}")
                return run(args, reporter)
        finally:
            if watch is not None:
                watch.stop()


def run(args: argparse.Namespace, reporter: Reporter) -> int:
    """The command's handler, with every way it can end turned into an exit code and at most one error line.
    A cancel requested on the way ends as cancelled even if something swallowed its exception."""
    try:
        code = args.handler(args, reporter)
        stopping.check()
        return code
    except BadInput as error:
        if stopping.requested():  # an input error raised while it was being interrupted
            return cancelled(reporter, Cancelled(stopping.reason()))
        return fail(reporter, str(error), EXIT_BAD_INPUT)
    except Cancelled as error:
        return cancelled(reporter, error)
    except OSError as error:
        if stopping.requested():
            return cancelled(reporter, Cancelled(stopping.reason()))
        refusal = write_refusal(Path(real_name(error.filename)) if error.filename else Path("output"), error)
        if refusal is not None:
            return fail(reporter, str(refusal), EXIT_BAD_INPUT)
        traceback.print_exc()
        return fail(reporter, f"internal error: {error}", EXIT_INTERNAL)
    except Exception as error:  # noqa: BLE001 - the last line of defence prints the traceback
        if stopping.requested():  # a library's error from being interrupted mid-call, not a bug
            return cancelled(reporter, Cancelled(stopping.reason()))
        traceback.print_exc()
        return fail(reporter, f"internal error: {type(error).__name__}: {error}", EXIT_INTERNAL)


def cancelled(reporter: Reporter, error: Cancelled) -> int:
    print(f"rubikssl: cancelled: {error}", file=sys.stderr)
    reporter.done("cancelled", EXIT_CANCELLED, message=str(error))
    return EXIT_CANCELLED


def fail(reporter: Reporter, message: str, code: int) -> int:
    message = " ".join(message.split())
    print(f"rubikssl: error: {message}", file=sys.stderr)
    reporter.error(message, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
