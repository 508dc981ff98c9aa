import os
import sys

# The simulator helpers (_plans, _sim_adapter) sit next to these tests; the shared test helpers
# (_utils, _bad_inputs) one level up.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
