"""Overlay training curves of runs: `python tools/plot.py runs=[dir1,dir2] keys=[loss,lr] out=curves.png`.

The code and its options are in `pipelines.curves`."""

from pipelines.curves import main

if __name__ == "__main__":
    main()
