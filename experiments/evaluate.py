"""`mia-gen-evaluate`: compute metrics and write outputs from cached attack scores only."""

from mia_gen.experiments.common import hydra_entry

main = hydra_entry("evaluate_only")

if __name__ == "__main__":
    main()
