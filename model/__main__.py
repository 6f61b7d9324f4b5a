"""`python -m model {train,generate,eval,demo}`; see `python -m model <command> --help`."""

from model.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
