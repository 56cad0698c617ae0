"""Run the llmforge of the checkout these jobs belong to, also where another llmforge is installed.

`ray job submit --working-dir . -- python jobs/pretrain.py` on the cluster image (llmforge installed in
site-packages) must run the code that was submitted, not the image's. So this checkout's ``platform/`` goes
first on ``sys.path``; llmforge then hands the same dir to every Ray worker (``runtime.ensure_ray``). When
an installed copy elsewhere is shadowed, one line on stderr says so and names both.
"""

import importlib.util
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1] / "platform"

if (CHECKOUT / "llmforge" / "__init__.py").is_file():
    spec = importlib.util.find_spec("llmforge") if "llmforge" not in sys.modules else None
    shadowed = Path(spec.origin).resolve().parent if spec and spec.origin else None
    sys.path.insert(0, str(CHECKOUT))
    if shadowed is not None and shadowed != (CHECKOUT / "llmforge").resolve():
        print(f"llmforge: running the checkout's code ({CHECKOUT / 'llmforge'}); the llmforge installed at "
              f"{shadowed} is not used", file=sys.stderr, flush=True)
