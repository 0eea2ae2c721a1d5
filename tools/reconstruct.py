"""Reconstruct images through a tokenizer: `python tools/reconstruct.py key=value ...`.

The code and its options are in `pipelines.reconstruct`."""

from pipelines.reconstruct import main

if __name__ == "__main__":
    main()
