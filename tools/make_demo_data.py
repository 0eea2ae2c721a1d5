"""`python tools/make_demo_data.py root=data/demo ...`: generate the built-in demo dataset (`pipelines.demo_data`)."""

import sys

from pipelines.demo_data import main

if __name__ == "__main__":
    sys.exit(main())
