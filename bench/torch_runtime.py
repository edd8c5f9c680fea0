"""What ``engine.runtime.prepare`` changes for a process that trains or embeds with torch.

    python bench/torch_runtime.py --out runs/bench [--steps 60] [--images 12000] [--side 40]

Each figure comes from fresh processes: torch's default setup, ``prepare()`` called first,
and ``OMP_WAIT_POLICY=PASSIVE`` in the environment the process starts with:

- ``step``: training steps of the default backbone (a batch of 128 images, forward,
  backward, Adam), one process alone and two side by side (both started together, as two
  trainings on one machine would be);
- ``embed``: the backbone's features of ``--images`` images through 4 test-time views, at the
  old inference batch (1,024 images a call) and at ``INFERENCE_BATCH``; both through the
  current code, which makes each chunk's views as it embeds it (the same numbers as making
  each view of every image first), so the two differ in the batch only.

Images are ``--side`` pixels square (28 by default; at 40 a block's activations for 128
images, 52 MB, are above glibc's largest ``mmap`` threshold). For each: wall seconds, the
CPU seconds spent in user space and in the kernel, and the minor page faults, from
``getrusage``. Writes torch_runtime.json, torch_runtime.md and torch_runtime.png (wall
time of each case, as a ratio to the default alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

OLD_BATCH = 1024


def child(kind: str, prepared: bool, steps: int, images: int, batch: int, side: int = 28) -> dict:
    """Run one case in this process (started fresh by :func:`run`) and measure it."""
    import resource
    import time

    if prepared:
        from engine.runtime import prepare

        prepare()
    import torch

    from engine.nn import MatchingNetwork

    torch.manual_seed(0)
    model = MatchingNetwork()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if kind == "step":
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        x = torch.rand(128, 1, side, side)
        for _ in range(steps):
            loss = model.g_backbone(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        model.views = 4
        with torch.no_grad():
            model.backbone_features(torch.rand(images, 1, side, side), batch_size=batch)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": time.perf_counter() - t0, "user_s": r1.ru_utime - r0.ru_utime,
            "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt}


def run(kind: str, prepared: bool, passive: bool, steps: int, images: int, batch: int, together: int = 1,
        side: int = 28) -> dict:
    """``together`` fresh processes of one case, started at once; their mean figures. ``passive``:
    they start with ``OMP_WAIT_POLICY=PASSIVE`` in their environment (else with none set)."""
    cmd = [sys.executable, __file__, "--child", kind, "--steps", str(steps), "--images", str(images),
           "--batch", str(batch), "--side", str(side)] + (["--prepared"] if prepared else [])
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(together)]
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{' '.join(cmd)} exited with {p.returncode}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return {key: sum(o[key] for o in outs) / len(outs) for key in outs[0]}


PASSIVE = "OMP_WAIT_POLICY=PASSIVE"
CASES = [  # (name, kind, prepared, passive, batch (-1: INFERENCE_BATCH), processes side by side)
    ("step, alone", "step", False, False, 0, 1),
    ("step, alone, prepared", "step", True, False, 0, 1),
    (f"step, alone, prepared, {PASSIVE}", "step", True, True, 0, 1),
    ("step, two side by side", "step", False, False, 0, 2),
    ("step, two side by side, prepared", "step", True, False, 0, 2),
    (f"step, two side by side, prepared, {PASSIVE}", "step", True, True, 0, 2),
    (f"embed, batch {OLD_BATCH}", "embed", False, False, OLD_BATCH, 1),
    ("embed, batch INFERENCE_BATCH", "embed", False, False, -1, 1),
    ("embed, batch INFERENCE_BATCH, prepared", "embed", True, False, -1, 1),
]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = [r["case"] for r in rows]
    ax.barh(range(len(rows)), [r["vs_default_alone"] for r in rows],
            color=["tab:green" if "PASSIVE" in n else "tab:olive" if "prepared" in n else "tab:gray" for n in names])
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("wall time / the same work, default setup, alone")
    ax.set_title("gray: default setup; olive: engine.runtime.prepare();\n"
                 "green: prepare() and OMP_WAIT_POLICY=PASSIVE", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--steps", type=int, default=60, help="training steps a process")
    ap.add_argument("--images", type=int, default=12000, help="images embedded a process")
    ap.add_argument("--side", type=int, default=28, help="image side in pixels")
    ap.add_argument("--kinds", nargs="+", choices=["step", "embed"], default=["step", "embed"],
                    help="which cases to run")
    ap.add_argument("--child", choices=["step", "embed"], help=argparse.SUPPRESS)
    ap.add_argument("--prepared", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        from engine.nn.matching import INFERENCE_BATCH

        batch = INFERENCE_BATCH if args.batch < 0 else args.batch
        print(json.dumps(child(args.child, args.prepared, args.steps, args.images, batch, args.side)))
        return {}
    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, kind, prepared, passive, batch, together in tqdm([c for c in CASES if c[1] in args.kinds],
                                                               desc="cases"):
        rows.append({"case": name, "kind": kind, "prepared": prepared, "omp_passive": passive, "processes": together,
                     **run(kind, prepared, passive, args.steps, args.images, batch, together, args.side)})
    base = {kind: next(r["seconds"] for r in rows if r["kind"] == kind) for kind in args.kinds}
    for r in rows:
        r["vs_default_alone"] = r["seconds"] / base[r["kind"]]
    doc = {"steps": args.steps, "images": args.images, "side": args.side, "results": rows}
    (args.out / "torch_runtime.json").write_text(json.dumps(doc, indent=2))
    lines = ["| case | wall s (a process) | vs the default alone | user s | kernel s | minor faults |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['seconds']:.2f} | {r['vs_default_alone']:.2f}x | {r['user_s']:.2f} | "
              f"{r['sys_s']:.2f} | {r['minor_faults']:,.0f} |" for r in rows]
    (args.out / "torch_runtime.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "torch_runtime.png")
    print("\n".join(lines))
    return doc


if __name__ == "__main__":
    main()
