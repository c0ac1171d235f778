"""`python -m pi05eval ...`: the Hydra entry point (see pi05eval/app.py)."""

from pi05eval.app import main

if __name__ == "__main__":
    main()
