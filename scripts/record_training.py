"""Collect a shapes training run's config and metrics into one results file, and ship its pipeline.

    python scripts/record_training.py runs/shapes-sd --name shapes-sd --command "python -m ..." [--ship]

Writes ``benchmarks/results/<name>-training-cpu.json`` (config, per-stage metrics, total minutes) and, with
``--ship``, replaces ``attncontrol/assets/models/<name>`` with the run's exported pipeline (fp16 diffusers folder).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

from attncontrol.training.common import cpu_label

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the training --out folder")
    parser.add_argument("--name", required=True, help="model name, e.g. shapes-sd")
    parser.add_argument("--command", required=True, help="the command that produced the run")
    parser.add_argument("--vae-run", type=Path, default=None, help="run folder whose autoencoder this run reused")
    parser.add_argument("--note", default="", help="how the run was made (threads, other load)")
    parser.add_argument("--log", type=Path, default=None, help="the run's log ('done in N minutes')")
    parser.add_argument("--ship", action="store_true", help="copy <run>/pipeline into the package's assets")
    args = parser.parse_args()

    record: dict = {
        "device": f"{cpu_label(torch.get_num_threads())}, torch {torch.__version__}",
        "command": args.command,
        "note": args.note,
        "config": json.loads((args.run / "config.json").read_text()),
    }
    vae_folder = args.vae_run or args.run
    stages = {"vae": vae_folder / "vae_metrics.json"}
    stages.update({stage: args.run / f"{stage}_metrics.json" for stage in ("unet", "flux")})
    total = 0.0
    for stage, path in stages.items():
        if path.exists():
            metrics = json.loads(path.read_text())
            record[stage] = metrics
            total += float(metrics["minutes"])
    if args.log is not None:
        # The log's "done in" is the whole command: the denoiser stage with its pool rendering and encoding, and the
        # autoencoder too when the same command trained it (its "vae: N steps" line is then in the log).
        text = args.log.read_text(errors="replace")
        found = re.findall(r"done in ([0-9.]+) minutes", text)
        if found:
            command_minutes = float(found[-1])
            vae_minutes = float(record["vae"]["minutes"]) if "vae" in record else 0.0
            if re.search(r"vae: [0-9]+ steps, round-trip", text):
                record["denoiser_stage_wall_minutes"] = round(command_minutes - vae_minutes, 1)
                total = command_minutes
            else:
                record["denoiser_stage_wall_minutes"] = command_minutes
                total = vae_minutes + command_minutes
    record["total_training_minutes"] = round(total, 1)
    out = ROOT / "benchmarks" / "results" / f"{args.name}-training-cpu.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} (training {total:.1f} min)")
    if args.ship:
        target = ROOT / "attncontrol" / "assets" / "models" / args.name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(args.run / "pipeline", target)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) / 1e6
        print(f"shipped {target} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
