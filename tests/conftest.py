import os
import sys

# Helper modules (reference, workers) import as top-level modules, also in spawned workers.
sys.path.insert(0, os.path.dirname(__file__))
