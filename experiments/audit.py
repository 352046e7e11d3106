"""`mia-gen-audit`: the release gate. Exit 0 when every attack stays under the thresholds, 1 when not.

    mia-gen-audit synthetic.path=release/synthetic.npy audit.max_auc=0.6
    mia-gen-audit model.checkpoint=release/model audit.access=white_box audit.max_tpr=0.05 audit.at_fpr=0.01
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.common import CONFIG_DIR
from mia_gen.errors import MiaGenError

log = logging.getLogger("mia_gen")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from mia_gen.audit import run_audit

    try:
        decision = run_audit(cfg, Path(HydraConfig.get().runtime.output_dir), CONFIG_DIR)
    except MiaGenError as error:
        log.error("%s", error)
        print(f"mia-gen-audit: error: {error}", file=sys.stderr)
        sys.exit(2)
    if not decision["passed"]:
        failed = [row["attack"] for row in decision["attacks"] if not row["passed"]]
        print(f"mia-gen-audit: FAILED ({', '.join(failed)})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
