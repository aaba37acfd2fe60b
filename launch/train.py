"""Entry point of the main job (see default_moe.train); launched by launch/run.sh under torchrun."""

import sys

from default_moe.train import main

if __name__ == "__main__":
    sys.exit(main())
