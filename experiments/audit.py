"""`mia-gen-audit`: the release gate. Exit 0 PASS, 1 FAIL, 2 no verdict (usage or config error, crash),
3 INCONCLUSIVE (no leakage shown beyond the thresholds, nor its absence: experiments/verdict.py).

    mia-gen-audit synthetic.path=release/synthetic.npy split.members_file=release/members.txt audit.max_auc=0.6
    mia-gen-audit model.checkpoint=release/model split.path=release/split.json audit.access=white_box \
        audit.max_tpr=0.05 audit.at_fpr=0.01

Hydra's `@hydra.main` exits 1 on its own errors (a typo'd key, an unknown attack), which a CI would
read as "leakage found"; so the Hydra task only records each job's outcome and `main()` maps the
outcomes to the exit code, with a one-line reason per job on stderr. A multirun's code is its most serious
job's: any FAIL -> 1, else any job without a verdict (or a job Hydra could not run) -> 2, else any
INCONCLUSIVE -> 3, else 0; the line names the job. A run that audits nothing (`--cfg job`, `--info`) exits 2:
only `--help` exits 0 without a verdict.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mia_gen.experiments.common import CONFIG_DIR, exit_for_missing_launcher, exit_for_version
from mia_gen.errors import MiaGenError

log = logging.getLogger("mia_gen")

PASSED, FAILED, NO_VERDICT, INCONCLUSIVE = 0, 1, 2, 3
SEVERITY = (FAILED, NO_VERDICT, INCONCLUSIVE, PASSED)  # a multirun exits with the first code any job has
CODES = {"PASS": PASSED, "FAIL": FAILED, "INCONCLUSIVE": INCONCLUSIVE}
HELP_FLAGS = ("--help", "-h", "--hydra-help")
_outcomes: list[tuple[int, str, str]] = []  # (exit code, one-line reason, job) of each job of this invocation


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def audit_job(cfg: DictConfig) -> None:
    """One Hydra job: run the gate and record its outcome (never raises, never exits)."""
    from mia_gen.experiments.release_gate import run_audit

    hydra_cfg = HydraConfig.get()
    job = f"job {hydra_cfg.job.num}" if hydra_cfg.mode.name == "MULTIRUN" else "the run"
    if hydra_cfg.overrides.task:
        job += f" ({' '.join(hydra_cfg.overrides.task)})"
    try:
        decision = run_audit(cfg, Path(hydra_cfg.runtime.output_dir), CONFIG_DIR)
    except MiaGenError as error:
        log.error("%s", error)
        _outcomes.append((NO_VERDICT, f"error: {_one_line(error)}", job))
        return
    except Exception as error:  # a crash is no verdict either: exit 2, traceback in the run's log
        log.exception("mia-gen-audit crashed")
        _outcomes.append((NO_VERDICT, f"crashed ({type(error).__name__}: {_one_line(error)}); no verdict", job))
        return
    if decision.get("tracking_error"):
        print(f"mia-gen-audit: warning: W&B failed after the verdict was written "
              f"({_one_line(decision['tracking_error'])}); the verdict stands (audit.md).", file=sys.stderr)
    outcome = decision["outcome"]
    failed = [row["attack"] for row in decision["attacks"] if row["decision"] == "fail"]
    undecided = [row["attack"] for row in decision["attacks"] if row["decision"] == "inconclusive"]
    reason = {"FAIL": f"FAILED ({', '.join(failed)})", "PASS": "PASSED",
              "INCONCLUSIVE": f"INCONCLUSIVE ({', '.join(undecided)} undecided; audit.md says how many records "
                              "would decide)"}[outcome]
    if decision.get("split_shifted"):
        reason += "; the split is distribution-shifted, so every AUC overstates leakage (audit.md)"
    _outcomes.append((CODES[outcome], reason, job))


def main() -> None:
    """The console script: run the Hydra job(s), then exit 0 / 1 / 2 / 3 (the most serious outcome of any job)."""
    if exit_for_version():
        return
    exit_for_missing_launcher("mia-gen-audit")  # exits 2 (NO_VERDICT) with the install line
    _outcomes.clear()
    try:
        audit_job()
        hydra_code = 0
    except SystemExit as exit_:
        hydra_code = exit_.code
    if hydra_code not in (0, None):  # Hydra stopped a job (or the whole sweep) before it recorded an outcome
        _outcomes.append((NO_VERDICT, "the command line or config is invalid, or a job failed inside Hydra "
                                      "(Hydra's message above); no verdict.", "Hydra"))
    if not _outcomes:
        if any(flag in sys.argv[1:] for flag in HELP_FLAGS):
            return
        print("mia-gen-audit: nothing was audited (the command printed the config or Hydra's info only); "
              "no verdict.", file=sys.stderr)
        sys.exit(NO_VERDICT)
    for code, reason, job in _outcomes if len(_outcomes) > 1 else ():
        print(f"mia-gen-audit: {job}: {reason}", file=sys.stderr)
    code, reason, job = min(_outcomes, key=lambda outcome: SEVERITY.index(outcome[0]))
    print(f"mia-gen-audit: {reason}" + (f" [{job}]" if len(_outcomes) > 1 else ""), file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
