"""Evaluate samples and tokenizers (FID, IS, precision/recall, rFID, demo metrics): `python tools/fid.py key=value ...`.

The code and its options are in `pipelines.eval.fid`."""

from pipelines.eval.fid import main

if __name__ == "__main__":
    main()
