"""Summarize the chain: one row per deployable model with its figures, read from the stages' robustness reports and the
student stage's cost table, and the model a stated rule recommends (`robust_cxr.summary`).

    python summarize.py runs/                          # writes runs/SUMMARY.md and runs/SUMMARY.json, prints the summary
    python summarize.py runs/ --sensitivity_floor 0.9  # the rule's settings: --clean_margin, --sensitivity_floor, --tie_margin
    python summarize.py runs/ --readme README.md       # and writes it between the README's results markers
    python summarize.py docs/results/synthetic_chain.json --readme README.md   # the README block of a recorded summary

The README's results block is always the rendering of a summary JSON: after a full chain, record
`runs/SUMMARY.json` as `docs/results/synthetic_chain.json` and render the README from it (tests/test_summary.py checks
that the two agree).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from robust_cxr.cli_errors import run_cli
from robust_cxr.summary import RecommendationRule, chain_summary, read_chain, render_summary, with_readme_results

SUMMARY_STEM = "SUMMARY"  # runs/SUMMARY.json and runs/SUMMARY.md


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("source", type=Path, help="the runs directory of the chain, or a summary JSON written before (SUMMARY.json)")
    parser.add_argument("--readme", type=Path, default=None, help="a README whose results block (between its markers) to rewrite")
    defaults = RecommendationRule()
    for rule_field in fields(RecommendationRule):
        parser.add_argument(f"--{rule_field.name}", type=float, default=None,
                            help=f"the recommendation rule's {rule_field.name} (default {getattr(defaults, rule_field.name)})")
    return parser


def main(args: list[str] | None = None) -> dict:
    """Summarizes (or, for a summary JSON, re-renders) the chain, prints it, writes it; returns the summary."""
    options = build_parser().parse_args(args)
    rule_settings = {rule_field.name: getattr(options, rule_field.name) for rule_field in fields(RecommendationRule)
                     if getattr(options, rule_field.name) is not None}
    if options.source.is_file():
        if rule_settings:
            raise ValueError(f"{options.source} is a summary made with its own rule; pass the runs directory to apply another ({rule_settings}).")
        summary = json.loads(options.source.read_text())
        markdown = render_summary(summary)
    else:
        summary = chain_summary(**read_chain(options.source), rule=RecommendationRule(**rule_settings), runs_dir=str(options.source))
        markdown = render_summary(summary)
        (options.source / f"{SUMMARY_STEM}.json").write_text(json.dumps(summary, indent=2) + "\n")
        (options.source / f"{SUMMARY_STEM}.md").write_text(f"# Chain summary\n\n{markdown}")
        print(f"Wrote {options.source / SUMMARY_STEM}.md and .json")
    print(markdown, end="")
    if options.readme is not None:
        options.readme.write_text(with_readme_results(options.readme.read_text(), markdown))
        print(f"Wrote the results block of {options.readme}")
    return summary


if __name__ == "__main__":
    run_cli(main)
