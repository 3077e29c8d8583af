"""``python -m compo`` is the same Hydra app as the ``compo`` console script."""

from compo.cli import main

if __name__ == "__main__":
    main()
