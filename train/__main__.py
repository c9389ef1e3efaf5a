"""``python -m train``: the main job (for now the attention demo; see :mod:`train.demo`)."""

from train.demo import main

if __name__ == "__main__":
    main()
