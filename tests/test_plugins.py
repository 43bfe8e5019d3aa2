"""package.module:function targets: found from the current folder, or a ConfigError saying why."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from smallfed.config import ConfigError
from smallfed.plugins import load_object


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding the user's own module, run from, and forgotten afterwards."""
    (tmp_path / "my_plugin_mod.py").write_text(
        "import math\n\ndef factory():\n    return 42\n\ndef helper():\n    return 0\n")
    (tmp_path / "broken_plugin_mod.py").write_text("import not_installed_pkg_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    for name in ("my_plugin_mod", "broken_plugin_mod"):
        sys.modules.pop(name, None)


def test_a_module_in_the_current_folder_is_found(user_folder: Path) -> None:
    assert load_object("my_plugin_mod:factory", "model")() == 42
    assert sys.path[-1] == str(user_folder)  # appended: it cannot shadow installed packages


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_mod_xyz:f", "model: 'no_such_mod_xyz:f': no module 'no_such_mod_xyz' on the "
                              "import path"),
        ("no_such_mod_xyz:f", "PYTHONPATH"),
        ("no_such_mod_xyz:f", "fab-include"),
        ("my_plugin_mod:nope", "module 'my_plugin_mod' ("),
        ("my_plugin_mod:nope", "has no 'nope'; it has factory, helper"),
        ("broken_plugin_mod:f", "it imports 'not_installed_pkg_xyz', which is not installed"),
        ("my_plugin_mod", "is not package.module:function"),
        (":f", "is not package.module:function"),
    ],
)
def test_what_is_missing_and_what_to_do(user_folder: Path, target: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^model: ") as err:
        load_object(target, "model")
    assert message in str(err.value)
