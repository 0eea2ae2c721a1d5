"""A web page to try a model (Generate, Reconstruct): `python tools/app.py ckpt=<AR run> port=7860`.

The code and its options are in `pipelines.app`; it needs the `[app]` extra (gradio)."""

from pipelines.app import main

if __name__ == "__main__":
    main()
