"""CPU-kernel pin check: does pinning the instruction set (:mod:`experiments.cpu_isa`) change the numbers, what
does it cost, and does this machine train bit for bit what the machine of the committed fingerprint trained?

One short teacher training of the default segmentation manifest (``--steps`` AdamW steps, no pretraining, the
manifest's own data and seed) runs in a fresh process per mode — the variables are read when the libraries first
run a kernel, so a mode cannot be switched inside a process:

- ``pinned``: what every run does (ATen ``avx2``, oneDNN ``AVX2``, MKL ``CBWR=AVX2``);
- ``native``: ``MASKD_BENCH_CPU_ISA=native``, the libraries pick the best kernels this processor has.

The modes alternate ``--rounds`` times (pinned, native, pinned, ...), so a drifting machine load hits both. Each
child reports its per-step losses (as exact float hex), a SHA-256 of the trained weights and the median step time.
The table says whether pinned runs agree with each other, whether native equals pinned on this processor (on an
AVX-512 machine it need not), the speed ratio, and whether the pinned digest equals the one in
``reports/cpu_isa_fingerprint.json`` — recorded with ``--record`` on the machine named in the file. A machine of
another CPU family that reproduces the digest trains the same weights bit for bit.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from experiments.cpu_isa import cpu_model, cpu_vector_isa

MANIFEST = "embedded_segmentation"
FINGERPRINT = "cpu_isa_fingerprint.json"
MODES = ("pinned", "native")
SKIPPED_STEPS = 2  # the loader's first batch and the allocator's first steps are not timed


# ------------------------------------------------------------------------------------------ one child
def child(steps: int, manifest: str = MANIFEST) -> dict:
    """Train the teacher ``steps`` steps in this process (its mode set by the environment) and describe it."""
    import torch

    from experiments.cpu_isa import cpu_kernels
    from experiments.engine import stages
    from experiments.engine.manifest import load_manifest
    from experiments.engine.training import train_loop
    from experiments.tasks import get_task

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    m = load_manifest(
        manifest,
        sets=[
            f"teacher_train.iterations={steps}",
            "teacher_train.warmup_iters=1",
            "teacher_train.log_every=1",
            "pretrain.enabled=false",
        ],
    )
    task = get_task(m.task)
    task.datasets(m)  # the scenes exist before the clock starts
    stages.seed_everything(0)
    model = task.build_model(m.teacher).to(stages.device())
    losses: dict[int, str] = {}
    stamps: list[float] = []

    def log(metrics: dict[str, float], step: int) -> None:
        stamps.append(time.perf_counter())
        total = metrics.get("loss/total", next((v for k, v in metrics.items() if k.startswith("loss")), None))
        if total is not None:
            losses[step] = float(total).hex()

    train_loop(model, None, m, m.teacher_train, 0, None, log, "isa-check/teacher", False, None, "teacher_train")
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    gaps = [b - a for a, b in zip(stamps[SKIPPED_STEPS:], stamps[SKIPPED_STEPS + 1 :])]
    return {
        "kernels": cpu_kernels(),
        "losses": [losses[k] for k in sorted(losses)],
        "weights_sha256": digest.hexdigest(),
        "step_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
        "torch": torch.__version__,
    }


def run_child(mode: str, steps: int, manifest: str = MANIFEST) -> dict:
    env = dict(os.environ)
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MASKD_BENCH_CPU_ISA"):
        env.pop(name, None)  # each mode from a clean slate: the package sets the pins on import
    if mode == "native":
        env["MASKD_BENCH_CPU_ISA"] = "native"
    command = [sys.executable, "-m", "experiments.checks.bench_cpu_isa", "--child", "--steps", str(steps)]
    out = subprocess.run([*command, "--manifest", manifest], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the table
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_cpu_isa", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record", action="store_true", help=f"write this machine's pinned digest to {FINGERPRINT}")
    parser.add_argument("--manifest", default=MANIFEST, help=argparse.SUPPRESS)  # the tests use a smoke manifest
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps, args.manifest)))
        return 0

    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            print(f"round {r + 1}/{args.rounds}: {mode} ...", file=sys.stderr, flush=True)
            results[mode].append(run_child(mode, args.steps))
    pinned, native = results["pinned"], results["native"]
    machine = {"cpu": cpu_model(), "vector_isa": cpu_vector_isa(), "torch": pinned[0]["torch"]}
    pinned_stable = len({r["weights_sha256"] for r in pinned}) == 1
    native_stable = len({r["weights_sha256"] for r in native}) == 1
    same_as_native = pinned[0]["weights_sha256"] == native[0]["weights_sha256"]
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(pinned[0]["losses"], native[0]["losses"])) if a != b), None
    )  # fmt: skip
    pinned_ms = statistics.median(r["step_ms"] for r in pinned)
    native_ms = statistics.median(r["step_ms"] for r in native)

    fingerprint_path = args.out / FINGERPRINT
    record = {
        "manifest": MANIFEST,
        "steps": args.steps,
        "kernels": pinned[0]["kernels"],
        "weights_sha256": pinned[0]["weights_sha256"],
        "final_loss": float.fromhex(pinned[0]["losses"][-1]),
        "recorded_on": machine,
    }
    if args.record:
        fingerprint_path.write_text(json.dumps(record, indent=2) + "\n")
    committed = json.loads(fingerprint_path.read_text()) if fingerprint_path.is_file() else None
    if args.record:
        versus = f"recorded by this run on {machine['cpu']} (`--record`); other machines compare with it"
    elif committed is None or committed.get("steps") != args.steps:
        versus = "no fingerprint for these steps to compare with (run with --record to write one)"
    elif committed["weights_sha256"] == record["weights_sha256"]:
        versus = f"**bit-identical** to the fingerprint recorded on {committed['recorded_on']['cpu']}"
    else:
        versus = f"**differs** from the fingerprint recorded on {committed['recorded_on']['cpu']}"
    if committed is not None and not args.record:
        versus += f" (`{committed['recorded_on']['vector_isa']}` there, `{machine['vector_isa']}` here)"

    args.out.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "mode": mode,
            "kernels": results[mode][0]["kernels"],
            "rounds": len(results[mode]),
            "step_ms_median": round(statistics.median(r["step_ms"] for r in results[mode]), 2),
            "ratio_to_pinned": round(statistics.median(r["step_ms"] for r in results[mode]) / pinned_ms, 3),
            "weights_sha256": results[mode][0]["weights_sha256"][:16],
            "runs_agree": len({r["weights_sha256"] for r in results[mode]}) == 1,
        }
        for mode in MODES
    ]
    with (args.out / "bench_cpu_isa.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# CPU-kernel pin: numbers and cost",
        "",
        f"Generated by `nox -s bench_cpu_isa` on {machine['cpu']} (widest vector extension: "
        f"`{machine['vector_isa']}`), torch {machine['torch']}; do not edit.",
        "",
        f"{args.steps} AdamW steps of the `{MANIFEST}` teacher (seed 0, no pretraining) per run, one fresh process "
        f"per run, modes alternated over {args.rounds} rounds. Step time: median interval between per-step logs "
        f"after the first {SKIPPED_STEPS}.",
        "",
        "| mode | kernels | runs | step (ms) | ratio to pinned | weights SHA-256 | runs agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | `{r['kernels']}` | {r['rounds']} | {r['step_ms_median']:.1f} | "
            f"{r['ratio_to_pinned']:.3f} | `{r['weights_sha256']}` | {'yes' if r['runs_agree'] else 'no'} |"
        )
    where = "identical" if same_as_native else f"different (first at logged step {first_diff})"
    lines += [
        "",
        f"- Pinned runs agree with each other: {'yes' if pinned_stable else 'no'}; native runs: "
        f"{'yes' if native_stable else 'no'}.",
        f"- Native vs pinned on this processor: the losses and weights are {where}.",
        f"- Cost of the pin: a step takes {pinned_ms / native_ms:.2f}× the native time.",
        f"- Pinned weights vs the committed fingerprint (`{FINGERPRINT}`): {versus}.",
        "",
    ]
    (args.out / "bench_cpu_isa.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
