"""``python -m mmstack`` (and ``torchrun -m mmstack``) run the CLI."""

from mmstack.cli import main

if __name__ == "__main__":
    main()
