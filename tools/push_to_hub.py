"""Push a run's checkpoint to the Hugging Face Hub with a model card: `python tools/push_to_hub.py run=... repo=...`.

The code and its options are in `pipelines.push_to_hub`."""

from pipelines.push_to_hub import main

if __name__ == "__main__":
    main()
