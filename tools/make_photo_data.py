"""`python tools/make_photo_data.py root=data/photos sizes=64,128`: crops of scikit-image's photographs
(`pipelines.photo_data`); val = whole held-out photographs."""

import sys

from pipelines.photo_data import main

if __name__ == "__main__":
    sys.exit(main())
