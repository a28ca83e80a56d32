"""README is current: its data-selection example runs (on a tiny synthetic dataset), its line counts hold."""
import re

from conftest import REPO


def test_readme_data_selection_example_runs(tiny_data_dir, monkeypatch, capsys):
    readme = (REPO / 'README.md').read_text()
    (snippet,) = [block for block in re.findall(r'```python\n(.*?)```', readme, re.S) if 'argsort' in block]
    snippet = (snippet.replace("'cifar10'", repr(str(tiny_data_dir)))
                      .replace('batch_size=1024', 'batch_size=64')     # the tiny set has 256 images
                      .replace('epochs=16', 'epochs=3'))
    monkeypatch.syspath_prepend(str(REPO))
    import airbench94
    monkeypatch.setitem(airbench94.hyp['opt'], 'epochs', 2)
    exec(snippet, {})
    accuracy = float(capsys.readouterr().out.strip())
    assert 0 <= accuracy <= 1


def test_readme_line_counts_of_airbench94_are_current():
    readme = ' '.join((REPO / 'README.md').read_text().split())
    claim = r'`airbench94\.py` is (\d+) lines: (\d+) of method, (\d+) of its own .*?, (\d+) of the shared'
    total, method, own, shared = map(int, re.search(claim, readme).groups())
    lines = (REPO / 'airbench94.py').read_text().splitlines()
    own_start = lines.index("#   This script's part of the bookkeeping   #") - 1  # the rule above the title
    shared_start = lines.index('#       Command line and bookkeeping        #') - 1
    assert (total, method, own, shared) == (len(lines), own_start, shared_start - own_start, len(lines) - shared_start)
