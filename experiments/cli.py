"""``maskd-bench``: the suite's command line.

maskd-bench check-golden DIR [--impl fast|literal|both]   compare every loss with the reference cases in DIR
maskd-bench bench-losses [--out reports]                  the loss benchmark (same as ``nox -s bench_losses``)
maskd-bench reproduce [--profile default|smoke]           the embedded main table (``nox -s reproduce_table``)
maskd-bench ablations [--only KNOB ...]                   MasKD ablations (same as ``nox -s ablations``)
maskd-bench screenshot-compare [--ablation KNOB]          MLflow compare page of an ablation, as a PNG
maskd-bench run MANIFEST [--set key=value ...]            one manifest: teacher, tokens, every method x seed
torchrun --nproc-per-node N -m experiments.cli run ...    the same on N processes (DDP; rank 0 tracks and reports)
maskd-bench show MANIFEST                                 the resolved manifest, after bases and --set
maskd-bench manifests                                     the shipped manifests
maskd-bench methods                                       the registered distillation methods
maskd-bench tables [--check]                              rewrite committed tables from their shipped exports
maskd-bench import-runs reports/embedded/runs.jsonl       the runs behind a committed table, into an MLflow store
maskd-bench verify-teacher reports/embedded/runs.jsonl --task segmentation   retrain a table's teacher, compare bits
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

ABLATION_CHOICES = (  # experiments.tables.ablations.ABLATION_NAMES, without importing it (a test holds them equal)
    "masks",
    "tokens",
    "custom_mask",
    "dice",
    "weight_head",
    "stages_detection",
    "stages_segmentation",
)


def _terminate(signum, _frame):  # SIGTERM -> SystemExit, so open MLflow runs end FAILED, not RUNNING
    raise SystemExit(128 + signum)


def _checked_methods(args: argparse.Namespace) -> list[str] | None:
    """``--methods`` and ``--seeds`` checked like the manifest's own lists, before any work."""
    from experiments.engine.manifest import load_manifest

    methods, seeds = args.methods, args.seeds
    if not methods and seeds is None:
        return None
    sets = []
    if methods:
        sets.append("methods=[" + ", ".join(f'"{m}"' for m in methods) + "]")
    if seeds is not None:
        sets.append("protocol.seeds=[" + ", ".join(str(s) for s in seeds) + "]")
    overrides = getattr(args, "overrides", None)  # the run profile's
    load_manifest(args.manifest, overrides, sets=[*(args.set or []), *sets])  # raises ManifestError naming the value
    return methods


def method_choices() -> list[str]:
    from experiments.engine.manifest import method_choices as choices

    return choices()


def _check_golden(args: argparse.Namespace) -> int:
    from experiments.checks.golden import check_golden, summary_line

    impls = ["fast", "literal"] if args.impl == "both" else [args.impl]
    all_results = []
    for impl in impls:
        try:
            results = check_golden(args.directory, impl=impl, rtol_value=args.rtol_value, rtol_grad=args.rtol_grad)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for r in results:
            print(f"[{impl}] {r.line()}" if len(impls) > 1 else r.line())
        all_results += results
    print(summary_line(all_results))
    return 0 if all_results and all(r.passed for r in all_results) else 1


def _bench_losses(args: argparse.Namespace) -> int:
    from experiments.checks.bench_losses import main as bench_main

    return bench_main(args.rest)


def _reproduce(args: argparse.Namespace) -> int:
    from experiments.tables.reproduce import reproduce

    with _executor(args) as executor:
        csv_path, md_path, parent = reproduce(
            args.profile,
            args.tracking_uri,
            args.out,
            progress=not args.no_progress,
            reuse=not args.no_reuse,
            runtime=_driver_runtime(args),
            executor=executor,
        )
    print(md_path.read_text())
    print(f"wrote {md_path} and {csv_path} (MLflow parent run {parent})")
    return 0


def _runtime(args: argparse.Namespace):
    from experiments.engine.stages import Runtime

    return Runtime(args.device, args.amp)


def _executor(args: argparse.Namespace):
    """``--executor``: the stage graph in this process, or as Ray tasks on ``--ray-address``."""
    from experiments.engine.executors import make_executor

    return make_executor(
        args.executor, args.ray_address, args.stage_cpus, args.stage_gpus, args.ray_cpus, args.device, args.amp
    )


def _driver_runtime(args: argparse.Namespace):
    """The runtime of stages run by this process: with ``--executor ray`` none are (the workers check
    ``--device``, so a driver without a GPU can drive GPU workers)."""
    return None if args.executor == "ray" else _runtime(args)


def _ablations(args: argparse.Namespace) -> int:
    from experiments.tables.ablations import run_ablations

    start = time.perf_counter()
    with _executor(args) as executor:
        done = run_ablations(
            args.only,
            args.profile,
            args.tracking_uri,
            args.out,
            progress=not args.no_progress,
            reuse=not args.no_reuse,
            runtime=_driver_runtime(args),
            executor=executor,
        )
    for knob, csv_path, md_path, png, wall in done:
        print(f"{knob:20s} {wall / 60:6.1f} min  {md_path}  {csv_path.name}  {png.name}")
    print(f"ablations[{args.profile}]: {len(done)} done in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def _screenshot(args: argparse.Namespace) -> int:
    from experiments.checks.screenshot import screenshot_compare

    path = screenshot_compare(args.ablation, args.tracking_uri, args.out)
    print(f"wrote {path}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """One manifest; under ``torchrun`` with several processes, rank 0 runs it and the others follow its
    training jobs (:mod:`experiments.engine.distributed`)."""
    from experiments.engine import distributed as torchrun
    from experiments.engine.manifest import load_manifest
    from experiments.engine.profiles import profile_overrides
    from experiments.engine.stages import Runtime, RuntimeConfigError

    args.overrides = profile_overrides(args.manifest, args.profile, args.set)  # before --set, which wins
    manifest = load_manifest(args.manifest, args.overrides, sets=args.set)
    methods = _checked_methods(args)
    place = None
    if torchrun.launched():
        if args.executor == "ray":
            raise RuntimeConfigError("--executor ray does not run under torchrun; use one or the other")
        place, device = torchrun.start(args.device)
        runtime = Runtime(device, args.amp)
    else:
        runtime = _driver_runtime(args)
    try:
        _check_batches(manifest, methods)
        if place is not None and not place.main:
            return torchrun.follow(runtime)  # rank 0 sends the training jobs; the rest is rank 0's
        torchrun.followers_listening()  # they passed the same checks
        return _run_manifest(args, manifest, methods, runtime)
    finally:
        torchrun.finish()


def _check_batches(manifest, methods: list[str] | None) -> None:
    """How each training stage's batch splits over this job's processes, checked before any work (one line
    naming the keys and the process count: :func:`experiments.engine.batches.geometry`)."""
    from experiments.engine.batches import geometry
    from experiments.engine.pipeline import needs_tokens

    geometry(manifest.teacher_train, "teacher_train")
    geometry(manifest.student_train, "student_train")
    if needs_tokens(manifest, methods or manifest.methods):
        geometry(manifest.tokens, "tokens")


def _run_manifest(args: argparse.Namespace, manifest, methods: list[str] | None, runtime) -> int:
    from tqdm import tqdm

    from experiments.engine.executors import StageGraph
    from experiments.engine.pipeline import Pipeline
    from experiments.engine.tracking import Tracker, parent_tags
    from experiments.tasks import get_task

    tracker = Tracker(args.tracking_uri)
    tracker.fail_stale_runs()
    pipeline = Pipeline(tracker, progress=not args.no_progress, reuse=not args.no_reuse, runtime=runtime)
    tags = parent_tags("manifest", manifest.task)
    graph = StageGraph()
    graph.add_manifest(manifest, methods, args.seeds)
    with _executor(args) as executor, tracker.run(f"manifest/{manifest.name}", tags, manifest.flat()) as parent:
        with tqdm(total=len(graph), desc=manifest.name, unit="run", disable=args.no_progress) as overall:
            results = executor.run(graph, pipeline, parent.info.run_id, overall)
    outcomes = {graph.nodes[key].outcome_name: result for key, result in results.items()}
    outcomes.pop("tokens", None)  # as before: the teacher and the students
    metric = get_task(manifest.task).primary_metric
    for name, outcome in outcomes.items():
        print(
            f"{name:16s} {metric} {outcome.metrics.get(metric, float('nan')):7.2f}  run {outcome.run_id}"
            + ("  (reused)" if outcome.reused else "")
        )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from experiments.engine.manifest import load_manifest
    from experiments.engine.pipeline import Pipeline
    from experiments.engine.stages import use_runtime
    from experiments.engine.tracking import Tracker, parent_tags
    from experiments.tables.calibrate import initial_losses

    manifest = load_manifest(args.manifest, sets=args.set)
    runtime = _runtime(args)
    tracker = Tracker(args.tracking_uri)
    tracker.fail_stale_runs()
    pipeline = Pipeline(tracker, progress=not args.no_progress, reuse=not args.no_reuse, runtime=runtime)
    tags = parent_tags("calibration", manifest.task)
    with tracker.run(f"calibrate/{manifest.name}", tags, manifest.flat()) as parent:
        teacher = pipeline.teacher(manifest, parent.info.run_id)
        tokens = (
            pipeline.tokens(manifest, teacher.state_dict, parent.info.run_id) if "maskd" in manifest.methods else None
        )
        with use_runtime(runtime):
            rows = initial_losses(manifest, teacher.state_dict, tokens.state_dict if tokens else None, args.batches)
        tracker.log_metrics(parent.info.run_id, {f"initial_kd/{r.method}": r.kd_loss for r in rows})
    print(f"{manifest.name}: mean over the first {args.batches} batches, untrained seed-0 student")
    print(f"{'method':8s} {'knob':20s} {'current':>12s} {'kd loss':>12s} {'task loss':>10s} {'suggested':>12s}")
    for r in rows:
        print(f"{r.method:8s} {r.knob:20s} {r.current:12.6g} {r.kd_loss:12.6g} {r.task_loss:10.4g} {r.suggested:12.6g}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from experiments.engine.manifest import load_manifest

    # the resolved values only: the data and weight files are checked by `run` (a paper manifest shows without them)
    print(json.dumps(load_manifest(args.manifest, sets=args.set, check_data=False).to_dict(), indent=2))
    return 0


def _tables(args: argparse.Namespace) -> int:
    from experiments.tables.reproduce import rebuild_tables

    written, differing = rebuild_tables(args.reports, check=args.check)
    for path in written:
        print(f"{'checked' if args.check else 'wrote'} {path}")
    for path in differing:
        print(f"error: {path} differs from what its export gives (rerun the table, or nox -s tables)", file=sys.stderr)
    return 1 if differing else 0


def _import_runs(args: argparse.Namespace) -> int:
    from experiments.tables.export import import_runs

    parent, count = import_runs(args.export, args.tracking_uri)
    print(f"imported {count} runs from {args.export} under parent run {parent}")
    return 0


def _verify_teacher(args: argparse.Namespace) -> int:
    from experiments.tables.verify import verify_teacher

    rows, where = verify_teacher(args.export, args.task, progress=not args.no_progress, seed=args.seed)
    print(f"{args.task} teacher of {args.export} ({where})")
    print(f"{'metric':28s} {'exported':>22s} {'retrained':>22s}  equal  {'retrained - exported':>20s}")
    for r in rows:
        diff = r.retrained - r.exported
        equal = "yes" if r.equal else "NO"
        print(f"{r.metric:28s} {r.exported!r:>22s} {r.retrained!r:>22s}  {equal:5s}  {diff:+20.4f}")
    differing = [r.metric for r in rows if not r.equal]
    if args.seed:  # a measurement of the seed spread, not a reproduction check
        print(f"teacher seed {args.seed} against the table's seed 0: {len(differing)} of {len(rows)} metrics differ")
        return 0
    if differing:
        print(f"error: {len(differing)} of {len(rows)} metrics differ: {', '.join(differing)}", file=sys.stderr)
        return 1
    print(f"all {len(rows)} metrics bit-identical")
    return 0


def _export(args: argparse.Namespace) -> int:
    from experiments.engine.export import export_run

    try:
        path, target = export_run(args.run_id, args.out, args.tracking_uri)
    except ValueError as exc:  # an unknown run, not a student run, an unfinished one, a checkpoint that does not fit
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}: the student alone; load_state_dict(strict=True) into {target}")
    return 0


def _convert_mmdet(args: argparse.Namespace) -> int:
    from experiments.engine.convert_mmdet import main as convert

    return convert(args.rest)


def _methods(args: argparse.Namespace) -> int:
    from experiments.methods import methods

    for name, spec in methods().items():
        knob = f"{name}.{spec.weight_knob}"
        print(f"{name:8s} {spec.title:8s} {'/'.join(spec.tasks):23s} {knob:20s} {spec.summary}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from experiments.engine.manifest import load_manifest, shipped_manifests

    for name in shipped_manifests():
        m = load_manifest(name, check_data=False)  # the paper manifests' data root is the user's to give
        print(f"{name:34s} {m.task:13s} {m.data.kind:11s} {m.paper_row}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskd-bench",
        description="MasKD reproducibility and benchmark suite (MasKD, FitNet, FGD, CWD).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    golden = sub.add_parser(
        "check-golden",
        help="check every loss against a directory of golden cases",
        description="Run this project's implementation of every case in DIR/golden.json in "
        "float64 and compare values (rtol 1e-10) and gradients (rtol 1e-8). "
        "Exits 1 if any case is off, missing or unknown.",
    )
    golden.add_argument("directory", type=Path, help="directory with golden.json and inputs_/grads_*.pt")
    golden.add_argument(
        "--impl",
        choices=["fast", "literal", "both"],
        default="fast",
        help="which form of each loss to check (default: fast, the one training uses)",
    )
    golden.add_argument("--rtol-value", type=float, default=1e-10)
    golden.add_argument("--rtol-grad", type=float, default=1e-8)
    golden.set_defaults(func=_check_golden)

    bench = sub.add_parser("bench-losses", help="loss benchmark (fast vs literal vs mse)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench_losses)

    def tracking_args(p: argparse.ArgumentParser, executor: str = "local") -> None:
        p.add_argument(
            "--tracking-uri",
            default=None,
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current "
            "directory; http://127.0.0.1:5000 for an mlflow server)",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--no-reuse", action="store_true", help="recompute runs even if a finished one matches")
        p.add_argument(
            "--reuse-stale",
            action="store_true",
            help="also reuse finished runs of the same config computed by other code (another code fingerprint); "
            "they are listed with their git commits",
        )
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        p.add_argument(
            "--executor",
            choices=["local", "ray"],
            default=executor,
            help="local: every stage in this process, one after another; ray: each stage a Ray task, started "
            "when its inputs exist, as many at once as the cluster has CPUs for (README: Beyond one machine); "
            f"default {executor}",
        )
        p.add_argument(
            "--ray-address",
            default="local",
            help="with --executor ray: local (default) starts a cluster in this process; auto joins the one "
            "`ray start` made on this host; HOST:PORT joins that head node",
        )
        p.add_argument(
            "--stage-cpus",
            type=int,
            default=1,
            help="torch threads of each stage, with either executor, and its CPUs in Ray (default 1: the same "
            "numbers on a laptop and on a 64-core node, which runs more stages at once). Another count sums "
            "floats in another order: other results, another run hash",
        )
        p.add_argument(
            "--stage-gpus",
            type=float,
            default=0,
            help="with --executor ray: GPUs per stage (default 1 with --device cuda)",
        )
        p.add_argument(
            "--ray-cpus",
            type=int,
            default=None,
            help="with --ray-address local: CPUs of the in-process cluster (default: every core)",
        )
        p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
        p.add_argument(
            "--amp",
            choices=["none", "bf16", "fp16"],
            default="none",
            help="bf16: forward passes and losses under torch.autocast in bfloat16; fp16: in float16 with a "
            "gradient scaler (steps with overflowing gradients are skipped, as the scaler means to); separate "
            "runs: own hashes",
        )

    rep = sub.add_parser(
        "reproduce",
        help="the embedded main table (runs or reuses every stage)",
        description="Run or reuse everything for the embedded main table and write main_table.md/.csv from MLflow.",
    )

    def profile_arg(p: argparse.ArgumentParser, default_help: str, out: str) -> None:
        p.add_argument(
            "--profile",
            choices=["default", "smoke"],
            default="default",
            help=f"default: {default_help}; smoke: the smoke manifests, seconds per run, meaningless numbers "
            f"(written under {out}smoke/)",
        )

    profile_arg(rep, "the full table (~45 min on 2 cores from an empty cache)", "reports/embedded/")
    rep.add_argument("--out", type=Path, default=None, help="directory for main_table.md/.csv")
    tracking_args(rep, executor="ray")
    rep.set_defaults(func=_reproduce)

    abl = sub.add_parser(
        "ablations",
        help="MasKD ablations on the embedded benchmark (``nox -s ablations``)",
        description="Run or reuse each ablation under its own MLflow parent run and write "
        "reports/embedded/ablations/<knob>.md/.csv/.png from MLflow.",
    )
    abl.add_argument(
        "--only",
        nargs="+",
        metavar="KNOB",
        choices=list(ABLATION_CHOICES),
        help=f"run only these ablations ({', '.join(ABLATION_CHOICES)}); default: all",
    )
    profile_arg(abl, "the committed tables (~36 min on 2 cores after the main table)", "reports/embedded/ablations/")
    abl.add_argument("--out", type=Path, default=None, help="directory for the tables and plots")
    tracking_args(abl, executor="ray")
    abl.set_defaults(func=_ablations)

    shot = sub.add_parser(
        "screenshot-compare",
        help="screenshot of the MLflow compare page for one ablation (headless Chromium, real mlflow server)",
    )
    shot.add_argument("--ablation", default="tokens", choices=list(ABLATION_CHOICES))
    shot.add_argument("--tracking-uri", default=None, help="sqlite store (default: mlflow.db in the current directory)")
    shot.add_argument("--out", type=Path, default=None, help="PNG path (default: reports/embedded/ablations/)")
    shot.set_defaults(func=_screenshot)

    run = sub.add_parser("run", help="run one manifest (teacher, tokens, every method x seed)")
    run.add_argument("manifest", help="a shipped manifest name (see `maskd-bench manifests`) or a .toml path")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a manifest value, e.g. --set student_train.iterations=100 (repeatable)",
    )
    run.add_argument("--methods", nargs="+", choices=method_choices(), help="default: the manifest's methods")
    run.add_argument("--seeds", nargs="+", type=int)
    run.add_argument(
        "--profile",
        choices=["default", "smoke"],
        default="default",
        help="smoke: every stage of the manifest in minutes (a few steps, small inputs, a few images, seed 0, "
        "weight files that are not on this machine dropped); the numbers mean nothing (default: as written)",
    )
    tracking_args(run)
    run.set_defaults(func=_run)

    cal = sub.add_parser(
        "calibrate-weights",
        help="size of every distillation loss at the start of training",
        description="Train or reuse the teacher (and tokens), then print each method's loss on the "
        "first training batches next to the task loss, and the weight that makes them "
        "equal (the rule the embedded manifests use).",
    )
    cal.add_argument("manifest")
    cal.add_argument("--set", action="append", metavar="KEY=VALUE")
    cal.add_argument("--batches", type=int, default=4)
    tracking_args(cal)
    cal.set_defaults(func=_calibrate)

    show = sub.add_parser("show", help="print a resolved manifest")
    show.add_argument("manifest")
    show.add_argument("--set", action="append", metavar="KEY=VALUE")
    show.set_defaults(func=_show)

    lst = sub.add_parser("manifests", help="list the shipped manifests")
    lst.set_defaults(func=_list)

    mth = sub.add_parser("methods", help="list the registered distillation methods (plug-ins)")
    mth.set_defaults(func=_methods)

    tab = sub.add_parser(
        "tables",
        help="rewrite every committed table from its shipped export (runs.jsonl), no training, no MLflow store",
    )
    tab.add_argument("--reports", type=Path, default=Path("reports"), help="the reports folder (default: ./reports)")
    tab.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed table differs")
    tab.set_defaults(func=_tables)

    exp = sub.add_parser(
        "export",
        help="write a finished student run's model alone (loads strictly into the plain torchvision model)",
    )
    exp.add_argument("run_id", help="the MLflow run id of a student run (see `maskd-bench run` output or mlflow ui)")
    exp.add_argument("out", type=Path, help="the .pth file to write")
    exp.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: as `run`)")
    exp.set_defaults(func=_export)

    conv = sub.add_parser(
        "convert-mmdet",
        help="map an mmdetection 2.x checkpoint onto this suite's torchvision detector",
        add_help=False,
    )
    conv.add_argument("rest", nargs=argparse.REMAINDER)
    conv.set_defaults(func=_convert_mmdet)

    imp = sub.add_parser("import-runs", help="load a table's shipped export into an MLflow store (for mlflow ui)")
    imp.add_argument("export", type=Path, help="a runs.jsonl written with a table, e.g. reports/embedded/runs.jsonl")
    imp.add_argument("--tracking-uri", default=None, help="target store (default: sqlite:///mlflow.db here)")
    imp.set_defaults(func=_import_runs)

    ver = sub.add_parser(
        "verify-teacher",
        help="retrain a committed table's teacher from its shipped manifest (nothing reused) and compare its metrics "
        "with the export, bit for bit",
    )
    ver.add_argument("export", type=Path, help="a runs.jsonl written with a table, e.g. reports/embedded/runs.jsonl")
    ver.add_argument("--task", required=True, choices=("detection", "segmentation"))
    ver.add_argument(
        "--seed",
        type=int,
        default=0,
        help="train the teacher at this seed instead of the table's (0), reusing this machine's pretrained backbones: "
        "the spread of two teacher seeds, for where bit-identity cannot be had (exit status 0)",
    )
    ver.add_argument("--no-progress", action="store_true")
    ver.set_defaults(func=_verify_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # several torchrun processes: `run` only
        from experiments.engine.distributed import refuse

        why = refuse(args.command)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
    debug = getattr(args, "debug", False)
    stage_cpus = getattr(args, "stage_cpus", None)
    if stage_cpus is not None:  # every stage this process runs, whatever the command (the threads are in its hash)
        if stage_cpus < 1:
            print(f"error: --stage-cpus {stage_cpus}: must be at least 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(stage_cpus)
    reuse_stale = getattr(args, "reuse_stale", False)
    if reuse_stale:
        from experiments.engine import pipeline

        pipeline.REUSE_STALE = True
    try:
        return args.func(args)
    except Exception as exc:  # one line for expected failures (bad input, a failed run); --debug: the traceback
        if debug:
            raise
        code = _expected_failure(exc)
        if code is None:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if reuse_stale:
            _list_stale_reuses()


def _expected_failure(exc: BaseException) -> int | None:
    """2 for bad input, 1 for a run that failed, None for anything unexpected (a bug: full traceback)."""
    from experiments.engine.checkpoints import CheckpointError
    from experiments.engine.convert_mmdet import ConversionError
    from experiments.engine.locks import ClaimTimeout
    from experiments.engine.manifest import ManifestError
    from experiments.engine.stages import NonFiniteLoss, RuntimeConfigError
    from experiments.engine.weights import WeightsError

    if isinstance(exc, ManifestError | RuntimeConfigError | FileNotFoundError | WeightsError | ConversionError):
        return 2
    if isinstance(exc, NonFiniteLoss | CheckpointError | ClaimTimeout) or _is_torch_load_error(exc):
        return 1
    return None


def _is_torch_load_error(exc: BaseException) -> bool:
    import pickle

    text = str(exc)
    return (
        isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text or "PytorchStreamReader" in text
    )


def _one_line(exc: BaseException) -> str:
    from experiments.engine.checkpoints import clean_torch_message

    message = clean_torch_message(str(exc)) or type(exc).__name__
    run_id = getattr(exc, "mlflow_run_id", None)
    if run_id:
        message += f" (MLflow run {run_id} ended FAILED)"
    return message


def _list_stale_reuses() -> None:
    from experiments.engine import pipeline

    if pipeline.STALE_REUSED:
        print(f"reused {len(pipeline.STALE_REUSED)} run(s) computed by other code (--reuse-stale):")
        for item in pipeline.STALE_REUSED:
            print(item.line())
    pipeline.STALE_REUSED.clear()
    pipeline.REUSE_STALE = False


if __name__ == "__main__":
    raise SystemExit(main())
