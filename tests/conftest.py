import sys
from pathlib import Path

import torch

# Tiny models: one thread avoids oversubscription when the machine is shared, and keeps
# float results independent of the thread count.
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
