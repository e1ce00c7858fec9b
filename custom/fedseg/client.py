"""Entry script FLARE runs on every site: the FedRef-Seg trainer (see fedseg/trainer.py)."""

from fedseg.trainer import main

if __name__ == "__main__":
    main()
