"""The SR-DiT ablation ladder on any track: train each rung, evaluate it, tabulate it.

    python -m ablations.ladder --track digits                  # run every rung, then write RESULTS.md
    python -m ablations.ladder --print                         # each rung's full train.sh command
    python -m ablations.ladder --track digits --render         # only re-render RESULTS.md + plot
    python -m ablations.ladder --track digits --iterations 2 --out /tmp/ladder_smoke   # smoke run (marked as such)

Rungs live in ablations/ladder.json and are cumulative. Each trained rung is a `train.py` run
at the track's budget (records are not written: ablations are not submissions). Each rung is
scored with the track's protocol, its own label mode (random labels until the "balanced labels"
rung) and every evaluation seed. Finished work is kept in <out>/results.json, so an
interrupted ladder continues where it stopped. RESULTS.md is rendered from results.json plus
the hand-written <out>/notes.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LADDER = Path(__file__).resolve().parent / "ladder.json"
METRICS = ("fid", "is", "precision", "recall", "kd")
LABELS = {"fid": "FID", "is": "IS", "precision": "Prec", "recall": "Rec", "kd": "KD", "sfid": "sFID"}


def load_ladder() -> dict:
    return json.loads(LADDER.read_text())


def rung_flags(ladder: dict) -> dict[str, list[str]]:
    """Cumulative train.py flags of every rung, by id."""
    flags, out = [], {}
    for rung in ladder["rungs"]:
        flags = flags + rung["flags"]
        out[rung["id"]] = list(flags)
    return out


def trained_rung(rung: dict) -> str:
    return rung.get("same_model_as", rung["id"])


def run_dir(runs_dir: Path, track_name: str, rung_id: str, seed: int, iterations: int) -> Path:
    smoke = f"_it{iterations}" if iterations else ""  # smoke models never stand in for real ones
    return runs_dir / f"ablation_{track_name}_{rung_id}_s{seed}{smoke}"


def train_rung(track: str, track_name: str, rung_id: str, flags: list[str], seed: int, runs_dir: Path,
               iterations: int) -> Path:
    out = run_dir(runs_dir, track_name, rung_id, seed, iterations)
    train_args = ["--track", track, "--seed", str(seed), "--runs_dir", str(runs_dir), "--run_name", out.name,
                  "--write_record", "false", "--resume", "auto", *flags,
                  *(["--iterations", str(iterations)] if iterations else [])]
    if (out / "model.safetensors").is_file():
        check_trained_config(out / "model.safetensors", train_args)
        print(f"[ladder] {rung_id} seed {seed}: trained model found, skipping training", flush=True)
        return out
    cmd = [sys.executable, str(ROOT / "train.py"), *train_args]
    print(f"[ladder] {rung_id} seed {seed}: {shlex.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def check_trained_config(model_path: Path, train_args: list[str]) -> None:
    """A model found on disk stands in for a rung only if it was trained with what the rung's
    command would train now (ladder.json or a track's defaults may have changed since)."""
    from train import MODEL_FORMAT, RESUME_MAY_CHANGE, parse_config, read_safetensors

    _, metadata = read_safetensors(model_path, MODEL_FORMAT, with_tensors=False)
    trained = json.loads(metadata["config"])
    wanted = dataclasses.asdict(parse_config(train_args))
    differ = [f"{k}: trained {trained.get(k)!r}, rung {v!r}" for k, v in sorted(wanted.items())
              if k not in RESUME_MAY_CHANGE and trained.get(k) != v]
    if differ:
        raise SystemExit(f"{model_path} was trained with other settings than this rung's command "
                         f"({'; '.join(differ)}); delete that run folder or use another --runs_dir")


def evaluate_rung(model_dir: Path, track: dict, labels: str, eval_seed: int, work: Path) -> dict:
    from evaluations.evaluate import evaluate_samples
    from generate import generate_to_npz, to_sampling_device
    from train import load_model

    model, _ = load_model(model_dir / "model.safetensors")
    to_sampling_device(model)
    protocol = dict(track["evaluation"], labels=labels, seed=eval_seed)
    samples = work / f"samples_{labels}_e{eval_seed}.npz"
    generate_to_npz(model, track, protocol, samples)
    return evaluate_samples(samples, track)


def run_ladder(track_arg: str, out: Path, seeds: list[int], eval_seeds: list[int], runs_dir: Path,
               rungs: list[str] | None, iterations: int = 0) -> dict:
    from train import load_track

    track = load_track(track_arg)
    smoke = bool(iterations)
    ladder = load_ladder()
    flags = rung_flags(ladder)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if results and results.get("smoke") != smoke:
        raise SystemExit(f"{results_path} holds {'smoke' if results['smoke'] else 'real'} results; "
                         "use another --out")
    results.update({"track": track["name"], "smoke": smoke, "budget": track["budget"],
                    "protocol": track["evaluation"]})
    results.setdefault("rungs", {})
    for rung in ladder["rungs"]:
        if rungs and rung["id"] not in rungs:
            continue
        model_rung = trained_rung(rung)
        for seed in seeds:
            done = results["rungs"].setdefault(rung["id"], {}).setdefault(str(seed), {})
            if all(str(e) in done for e in eval_seeds):
                continue
            model_dir = train_rung(track_arg, track["name"], model_rung, flags[model_rung], seed, runs_dir,
                                   iterations)
            for e in eval_seeds:
                if str(e) not in done:
                    done[str(e)] = evaluate_rung(model_dir, track, rung["labels"], e, model_dir)
                    _write_json(results_path, results)
                    print(f"[ladder] {rung['id']} seed {seed} eval seed {e}: fid {done[str(e)]['fid']:.4f}",
                          flush=True)
    _write_json(results_path, results)
    return results


def _write_json(path: Path, data: dict) -> None:
    from preprocessing.shards import atomic_write
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def summarize(results: dict) -> list[dict]:
    """Per rung and metric: mean and std over every (training seed, evaluation seed) pair."""
    rows = []
    for rung in load_ladder()["rungs"]:
        runs = [m for per_seed in results.get("rungs", {}).get(rung["id"], {}).values() for m in per_seed.values()]
        if not runs:
            continue
        row = {"id": rung["id"], "name": rung["name"], "n": len(runs),
               "train_seeds": len(results["rungs"][rung["id"]]), "published": rung.get("published")}
        for m in METRICS:
            values = np.array([r[m] for r in runs], dtype=np.float64)
            row[m] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan"))
        rows.append(row)
    return rows


def _cell(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    return f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def render(out: Path) -> str:
    """RESULTS.md + ladder.png from results.json and notes.md."""
    results = json.loads((out / "results.json").read_text())
    rows = summarize(results)
    ladder = load_ladder()
    proto = results["protocol"]
    lines = ["<!-- Generated by `python -m ablations.ladder --render` from results.json and notes.md. -->",
             f"# The SR-DiT ladder on the `{results['track']}` track", ""]
    if results.get("smoke"):
        lines += ["**SMOKE RUN: shortened budget; these numbers mean nothing.**", ""]
    lines += [f"Each rung trained at the track budget ({results['budget']['iterations']} iterations x batch "
              f"{results['budget']['global_batch']}) and scored with the track protocol ({proto['num_samples']} "
              f"samples, {proto['sampler']} {proto['num_steps']} steps, no guidance, features "
              f"`{proto['feature_network']}`), random labels until the balanced-labels rung. Mean ± std over "
              f"every (training seed, evaluation seed) pair; n pairs per row. KD: unbiased polynomial-kernel "
              f"MMD² on the same features, {proto['kernel_distance']['num_subsets']} subsets of "
              f"{proto['kernel_distance']['subset_size']}, no scaling.", "",
              "| rung | n | " + " | ".join(LABELS[m] for m in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    for row in rows:
        lines.append(f"| {row['name']} | {row['n']} | " + " | ".join(_cell(row[m]) for m in METRICS) + " |")
    lines += ["", "![FID per rung](ladder.png)", "", "## The published ladder (ImageNet 256)", "",
              f"Source: {ladder['source']} Not comparable with the numbers above (other data, "
              "features, model and budget); shown for the direction of each step.", "",
              "| rung | FID | sFID | IS | Prec | Rec | KDD |", "|---|---|---|---|---|---|---|"]
    for rung in ladder["rungs"]:
        p = rung.get("published")
        if p:
            lines.append(f"| {p.get('name', rung['name'])} | {p['fid']} | {p['sfid']} | {p['is']} | "
                         f"{p['precision']} | {p['recall']} | {p['kd']} |")
    notes = out / "notes.md"
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    text = "\n".join(lines) + "\n"
    (out / "RESULTS.md").write_text(text)
    _plot(rows, out / "ladder.png", results["track"])
    return text


def _plot(rows: list[dict], path: Path, track: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
    means = [r["fid"][0] for r in rows]
    errs = [0 if np.isnan(r["fid"][1]) else r["fid"][1] for r in rows]
    ax.errorbar(range(len(rows)), means, yerr=errs, marker="o", capsize=3)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("FID (digits net)" if track == "digits" else "FID")
    ax.set_title(f"SR-DiT ladder on the {track} track")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--track", default="digits")
    parser.add_argument("--out", default=None, help="default: ablations/<track>")
    # the design: 2 training x 2 sampling seeds per rung (the committed digits results, re-run with
    # the current network, have training seed 0 so far: the plain command adds seed 1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--eval_seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds")
    parser.add_argument("--runs_dir", default="runs/ablations")
    parser.add_argument("--rungs", nargs="+", default=None, help="only these rung ids")
    parser.add_argument("--iterations", type=int, default=0, help="smoke run: override the budget")
    parser.add_argument("--print", action="store_true", help="print each rung's train.sh flags and exit")
    parser.add_argument("--render", action="store_true", help="only re-render RESULTS.md and the plot")
    args = parser.parse_args(argv)
    ladder = load_ladder()
    if args.print:
        flags = rung_flags(ladder)
        for rung in ladder["rungs"]:
            model = trained_rung(rung)
            note = f"  (model of '{model}', {rung['labels']} labels)" if model != rung["id"] else \
                f"  ({rung['labels']} labels at evaluation)"
            print(f"{rung['id']:<10} bash train.sh {shlex.join(flags[model])}{note}")
        return 0
    out = Path(args.out or ROOT / "ablations" / Path(args.track).stem)
    out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        run_ladder(args.track, out, args.seeds, args.eval_seeds, Path(args.runs_dir), args.rungs, args.iterations)
    render(out)
    print(f"[ladder] wrote {out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
