"""Convert official SEED-Voken IBQ / LlamaGen checkpoints: `python tools/convert_checkpoint.py key=value ...`.

The code and its options are in `pipelines.convert`."""

from pipelines.convert import main

if __name__ == "__main__":
    main()
