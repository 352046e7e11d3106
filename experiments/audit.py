"""`mia-gen-audit`: the release gate. Exit 0 passed, 1 failed, 2 no verdict (usage or config error, crash).

    mia-gen-audit synthetic.path=release/synthetic.npy split.members_file=release/members.txt audit.max_auc=0.6
    mia-gen-audit model.checkpoint=release/model split.path=release/split.json audit.access=white_box \
        audit.max_tpr=0.05 audit.at_fpr=0.01

Hydra's `@hydra.main` exits 1 on its own errors (a typo'd key, an unknown attack), which a CI would
read as "leakage found"; so the Hydra task only records each job's outcome and `main()` maps the
outcomes to the exit code, with a one-line reason on stderr.
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

PASSED, FAILED, NO_VERDICT = 0, 1, 2
_outcomes: list[tuple[int, str]] = []  # (exit code, one-line reason) of each job of this invocation


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def audit_job(cfg: DictConfig) -> None:
    """One Hydra job: run the gate and record its outcome (never raises, never exits)."""
    from mia_gen.experiments.release_gate import run_audit

    try:
        decision = run_audit(cfg, Path(HydraConfig.get().runtime.output_dir), CONFIG_DIR)
    except MiaGenError as error:
        log.error("%s", error)
        _outcomes.append((NO_VERDICT, f"error: {_one_line(error)}"))
        return
    except Exception as error:  # a crash is no verdict either: exit 2, traceback in the run's log
        log.exception("mia-gen-audit crashed")
        _outcomes.append((NO_VERDICT, f"crashed ({type(error).__name__}: {_one_line(error)}); no verdict"))
        return
    if decision.get("tracking_error"):
        print(f"mia-gen-audit: warning: W&B failed after the verdict was written "
              f"({_one_line(decision['tracking_error'])}); the verdict stands (audit.md).", file=sys.stderr)
    failed = [row["attack"] for row in decision["attacks"] if not row["passed"]]
    reason = f"FAILED ({', '.join(failed)})" if failed else "PASSED"
    if decision.get("split_shifted"):
        reason += "; the split is distribution-shifted, so every AUC overstates leakage (audit.md)"
    _outcomes.append((FAILED if failed else PASSED, reason))


def main() -> None:
    """The console script: run the Hydra job(s), then exit 0 / 1 / 2 (the worst outcome of any job)."""
    if exit_for_version():
        return
    exit_for_missing_launcher("mia-gen-audit")  # exits 2 (NO_VERDICT) with the install line
    _outcomes.clear()
    try:
        audit_job()
        hydra_code = 0
    except SystemExit as exit_:
        hydra_code = exit_.code
    if not _outcomes:
        if hydra_code in (0, None):
            return  # --help, --cfg, ...: nothing was audited
        print("mia-gen-audit: error: the command line or config is invalid (Hydra's message above); no verdict.",
              file=sys.stderr)
        sys.exit(NO_VERDICT)
    code, reason = max(_outcomes, key=lambda outcome: outcome[0])
    print(f"mia-gen-audit: {reason}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
