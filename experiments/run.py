"""`mia-gen`: the whole pipeline — train, sample, attack, evaluate — each stage cached."""

from mia_gen.experiments.common import hydra_entry

main = hydra_entry("evaluate")

if __name__ == "__main__":
    main()
