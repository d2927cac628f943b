import sys
from pathlib import Path

# tests/guestvm.py and friends are plain modules next to the tests.
sys.path.insert(0, str(Path(__file__).parent))
