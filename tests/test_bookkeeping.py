"""The command line and bookkeeping: one section, the same in every script, carried by a tool. Its
behaviour is specified once, on airbench94 (test_cli.py, test_checkpoint.py, test_training.py)."""
import ast

import pytest

import sync_bookkeeping
from conftest import ALL_SCRIPTS, REPO


@pytest.mark.parametrize('name', ALL_SCRIPTS)
def test_every_script_carries_airbench94s_bookkeeping_byte_for_byte(name):
    assert sync_bookkeeping.split(REPO / f'{name}.py')[1] == sync_bookkeeping.split(REPO / 'airbench94.py')[1], \
        f'{name}.py: run `python tests/sync_bookkeeping.py`'


def test_the_tool_knows_every_script():
    assert {str(path.relative_to(REPO))[:-3] for path in sync_bookkeeping.scripts()} == set(ALL_SCRIPTS)


def test_the_tool_carries_an_edit_to_every_copy_and_leaves_the_rest_alone(tmp_path, monkeypatch):
    (tmp_path / 'ablations').mkdir()
    for name in ('airbench94', 'airbench95', 'ablations/main0_network'):
        (tmp_path / f'{name}.py').write_text((REPO / f'{name}.py').read_text())
    monkeypatch.setattr(sync_bookkeeping, 'REPO', tmp_path)
    edited = (tmp_path / 'airbench94.py').read_text().replace('def check(', '# an edit\ndef check(')
    (tmp_path / 'airbench94.py').write_text(edited)
    own = sync_bookkeeping.split(tmp_path / 'airbench95.py')[0]
    assert [path.name for path in sync_bookkeeping.drifted()] == ['airbench95.py', 'main0_network.py']
    sync_bookkeeping.sync()
    assert sync_bookkeeping.drifted() == []
    assert (tmp_path / 'airbench95.py').read_text() == own + sync_bookkeeping.split(tmp_path / 'airbench94.py')[1]


@pytest.mark.parametrize('name', ALL_SCRIPTS)
def test_the_method_comes_first_each_name_once_and_train_fits_on_a_screen(name):
    own, shared = sync_bookkeeping.split(REPO / f'{name}.py')
    tree = ast.parse(own + shared)
    defined_in_own = {node.name for node in ast.parse(own).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert {'CifarLoader', 'make_net', 'train', 'infer', 'evaluate'} <= defined_in_own
    names = [node.name if hasattr(node, 'name') else node.targets[0].id for node in tree.body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))]
    assert len(names) == len(set(names))  # nothing defined twice
    (train,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == 'train']
    assert train.end_lineno - train.lineno + 1 <= 70
