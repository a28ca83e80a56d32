"""Carry airbench94.py's command-line-and-bookkeeping section to every other script of the family.

    python tests/sync_bookkeeping.py           # rewrite the copies that differ, and name them
    python tests/sync_bookkeeping.py --check   # only name them (exit status 1 if any)

The section runs from its heading to the end of the file; everything above it is the script's own.
"""
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
HEADING = '#############################################\n#       Command line and bookkeeping        #\n'


def scripts():
    return sorted(REPO.glob('airbench*.py')) + sorted(REPO.glob('ablations/*.py'))


def split(path):
    """(the script's own part, the shared section) of a script."""
    text = path.read_text()
    start = text.find(HEADING)
    if start < 0:
        raise SystemExit(f'{path.relative_to(REPO)} has no "Command line and bookkeeping" section')
    return text[:start], text[start:]


def drifted():
    shared = split(REPO / 'airbench94.py')[1]
    return [path for path in scripts() if split(path)[1] != shared]


def sync():
    shared = split(REPO / 'airbench94.py')[1]
    for path in drifted():
        path.write_text(split(path)[0] + shared)
        print(f'updated {path.relative_to(REPO)}')


if __name__ == '__main__':
    if sys.argv[1:] == ['--check']:
        paths = drifted()
        print('\n'.join(f'differs: {path.relative_to(REPO)}' for path in paths) or 'all copies are the same')
        sys.exit(1 if paths else 0)
    sync()
