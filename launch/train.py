"""Run one rank of a dstk recipe: `deepspeed launch/train.py --recipe R [key=value ...]`.

Any script the launcher runs can do the same with `toolkit.finetune(recipe)`.
"""

import sys

from toolkit.launching.worker import main

if __name__ == "__main__":
    sys.exit(main())
