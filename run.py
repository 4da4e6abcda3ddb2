#!/usr/bin/env python
"""The pipeline's command line: `python run.py COMMAND ...` (also installed as `chaos-liver`).

The commands live in pipeline/app/cli.py; `python run.py --help` lists them.
"""
import sys

from pipeline.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
