"""The main job's wall time as a new user meets it: a fresh clone, a new virtual environment, a cold pip cache.

Clones this repository's HEAD (committed work only) into a new folder, creates a virtual environment there, installs the
project as the README says (``pip install -e ".[dev]"``) with ``PIP_NO_CACHE_DIR=1``, so that every package is fetched
and installed, then runs the main command ``bash run_chain.sh``, whose console output it passes through. Times the
install, each stage (from run_chain.sh's ``=== [i/n] <stage>: ... (elapsed N s)`` lines), the chain and the whole against
the 15-minute target, and says whether the chain's summary figures equal the README's of that commit
(`docs/results/synthetic_chain.json`).
Writes benchmarks/results/main_job_time_<device>.{json,md} (the device the chain ran on). Run it on an otherwise idle
machine.

    python benchmarks/main_job_time.py                     # about 15 minutes on 2 CPU cores; the clone is deleted after
    python benchmarks/main_job_time.py --keep /tmp/fresh   # keeps the clone there, with its runs/ and .venv
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 15 * 60
RECORDED_SUMMARY = Path("docs/results/synthetic_chain.json")  # in the clone: the README block of the commit timed
STAGE_LINE = re.compile(r"^=== \[\d+/\d+\] (\S+): .*\(elapsed (\d+) s\)$", re.MULTILINE)
FINISHED_LINE = re.compile(r"^=== chain finished in (\d+) s$", re.MULTILINE)


def stage_seconds(chain_output: str) -> dict[str, int]:
    """Each stage's wall seconds, in order, from run_chain.sh's console output: a stage runs from its ``=== [i/n] <stage>:
    ... (elapsed N s)`` line to the next one's, the last to ``=== chain finished in N s``. ValueError if either is missing."""
    text = chain_output.replace("\r", "\n")  # progress bars redraw with carriage returns
    starts = [(match[1], int(match[2])) for match in STAGE_LINE.finditer(text)]
    finished = FINISHED_LINE.search(text)
    if not starts or finished is None:
        raise ValueError("run_chain.sh's output lacks its '=== [i/n] <stage>: ... (elapsed N s)' or '=== chain finished in N s' "
                         "lines: did the chain fail? Its output is above.")
    ends = [elapsed for _, elapsed in starts[1:]] + [int(finished[1])]
    return {stage: end - start for (stage, start), end in zip(starts, ends)}


def figures(summary: dict) -> dict[str, dict]:
    """Per model of a chain summary (`robust_cxr.summary.chain_summary`), its clean, gray-box and white-box figures and
    verdict: what a rerun must reproduce (latencies vary from run to run and are left out)."""
    return {model["name"]: {key: model[key] for key in ("clean", "graybox", "whitebox", "verdict")} for model in summary["models"]}


def markdown_table(result: dict) -> str:
    """The timings of `result` (the JSON this benchmark writes) as Markdown."""
    lines = [f"Main job from a fresh clone of commit {result['commit']}, new virtual environment, PIP_NO_CACHE_DIR=1; "
             f"chain on {result['device']}; {result['processor']}, {result['cpu_cores']} CPU cores.", "", "| step | wall time (s) |", "|---|---|",
             f"| install (`pip install -e \".[dev]\"`) | {result['install_seconds']:.0f} |"]
    lines += [f"| {stage} | {seconds} |" for stage, seconds in result["stage_seconds"].items()]
    lines += [f"| reports and summary printed | {result['chain_seconds'] - sum(result['stage_seconds'].values()):.0f} |",
              f"| chain (`bash run_chain.sh`) | {result['chain_seconds']:.0f} |",
              f"| **install and chain** | **{result['total_seconds']:.0f}** |", "",
              f"Ratio to the {TARGET_SECONDS // 60}-minute target: {result['ratio_to_target']:.2f} "
              f"({'met' if result['ratio_to_target'] <= 1 else 'missed'}). Summary figures equal the README's "
              f"({RECORDED_SUMMARY}): {'yes' if result['figures_equal_readme'] else 'no'}."]
    return "\n".join(lines) + "\n"


def run_teed(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Runs `command`, passing its output (stderr included) through to this console; returns that output.
    CalledProcessError if it fails."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = bytearray()
    while chunk := process.stdout.read1(1 << 16):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        output += chunk
    if process.wait() != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    return output.decode(errors="replace")


def time_main_job(clone: Path) -> dict:
    """Clones the repository into `clone` (which must not exist), installs and runs the chain there; returns the timings."""
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    commit = subprocess.run(["git", "describe", "--always"], cwd=clone, capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "venv", ".venv"], cwd=clone, check=True)
    venv = clone / ".venv"
    env = dict(os.environ, PIP_NO_CACHE_DIR="1", VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONHOME", None)
    start = time.perf_counter()
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-e", ".[dev]"], cwd=clone, env=env, check=True)
    installed = time.perf_counter()
    chain_output = run_teed(["bash", "run_chain.sh"], clone, env)
    finished = time.perf_counter()
    summary = json.loads((clone / "runs/SUMMARY.json").read_text())
    return dict(commit=commit, device=summary["cost_device"], install_seconds=installed - start, stage_seconds=stage_seconds(chain_output),
                chain_seconds=finished - installed, total_seconds=finished - start,
                ratio_to_target=(finished - start) / TARGET_SECONDS,
                figures_equal_readme=figures(summary) == figures(json.loads((clone / RECORDED_SUMMARY).read_text())))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None, help="clone into this folder (must not exist) and keep it")
    parser.add_argument("--output", type=Path, default=None,
                        help="the JSON (default benchmarks/results/main_job_time_<device>.json); the .md goes beside it")
    args = parser.parse_args(argv)
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep} exists: give a new folder (the clone goes there).")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="main_job_time_")) / "clone"
    try:
        timings = time_main_job(folder)
    finally:
        if args.keep is None:
            shutil.rmtree(folder.parent, ignore_errors=True)
    result = dict(benchmark="main_job_time", processor=platform.processor() or platform.machine(), cpu_cores=os.cpu_count(),
                  target_seconds=TARGET_SECONDS, **timings)
    output = args.output or REPO / f"benchmarks/results/main_job_time_{result['device']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    output.with_suffix(".md").write_text(table)
    print(table, end="")
    return 0 if result["ratio_to_target"] <= 1 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
