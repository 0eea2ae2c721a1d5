"""Sample class-conditional images from an AR checkpoint: `python tools/sample.py key=value ...`.

The code and its options are in `pipelines.sample`."""

from pipelines.sample import main

if __name__ == "__main__":
    main()
