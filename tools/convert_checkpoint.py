"""Convert official SEED-Voken IBQ / LlamaGen checkpoints: ``python -m pipelines.convert`` under another name.

    python tools/convert_checkpoint.py source=ibq-ar src=/ckpts/ibq_ar_B.ckpt out=runs/ibq_ar_B
    python tools/convert_checkpoint.py source=llamagen-vq src=vq_ds16_c2i.pt out=runs/llamagen_vq16
    python tools/convert_checkpoint.py source=llamagen-gpt src=c2i_B_256.pt out=runs/llamagen_B \
        tokenizer=runs/llamagen_vq16

Options and sources: conf/convert.yaml and pipelines/convert.py (needs the project installed, ``pip install -e .``,
or ``PYTHONPATH=.``).
"""

from pipelines.convert import main

if __name__ == "__main__":
    main()
