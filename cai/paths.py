"""Where a checkout keeps what CAI ships: data, demo weights, state machine, handlers.

Imports nothing heavy, so the CLI can name these in its help at start-up.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SDSS_CUTOUTS = REPO / "data" / "sdss_dr17_galaxies_32x32.npz"  # the 354 real SDSS DR17 cutouts
SDSS_MGS_TEST = REPO / "data" / "sdss_mgs" / "SDSS_MGS.test"
DEMO_WEIGHTS = REPO / "model" / "astromae-demo.safetensors"
STATE_MACHINE = REPO / "statemachine" / "cai.asl.json"
HANDLERS = REPO / "handlers"
