"""`python -m omni_model.train --settings FILE`: one training run (see omni_model.train.loop)."""

from .loop import main

if __name__ == "__main__":
    main()
