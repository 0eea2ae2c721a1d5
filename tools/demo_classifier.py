"""Train (or reuse) the demo classifier and print its accuracy: `python tools/demo_classifier.py key=value ...`.

The code and its options are in `pipelines.eval.demo_classifier`."""

from pipelines.eval.demo_classifier import main

if __name__ == "__main__":
    main()
