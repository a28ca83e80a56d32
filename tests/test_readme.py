"""README's code runs: its data-selection example, on a tiny synthetic dataset."""
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
