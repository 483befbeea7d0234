"""Where the repository and the workplace's shared folder (../shared: real model script, calibration data) are."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CALIB_DIR = SHARED / "data" / "calib"
