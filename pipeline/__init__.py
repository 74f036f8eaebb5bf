"""The pipeline's stages and commands, each run as `python -m pipeline.<name>`."""

import gc
import sys

# `python -m pipeline.<name>` (sys.argv[0] is "-m" while Python finds the module): no garbage
# collection while torch, MLflow and the rest are imported, some 360 k objects that live as long as
# the process and that each collection would walk; run_stage turns it back on and freezes them out of
# its sight: about 1 s of the train and evaluate stages' start-up (docs/performance.md, "What an
# experiment costs besides training").
if sys.argv[:1] == ["-m"]:
    gc.disable()
