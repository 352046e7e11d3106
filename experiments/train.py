"""`mia-gen-train`: run the pipeline up to the train stage (earlier stages from the cache)."""

from mia_gen.experiments.common import hydra_entry

main = hydra_entry("train")

if __name__ == "__main__":
    main()
