"""`mia-gen-sample`: run the pipeline up to the sample stage (earlier stages from the cache)."""

from mia_gen.experiments.common import hydra_entry

main = hydra_entry("sample")

if __name__ == "__main__":
    main()
