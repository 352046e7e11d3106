"""`mia-gen-attack`: run the pipeline up to the attack stage (earlier stages from the cache)."""

from mia_gen.experiments.common import hydra_entry

main = hydra_entry("attack")

if __name__ == "__main__":
    main()
