"""The ``groupseg`` command surface: one lazy command table, options checked before any work, a
missing extra named in one line, and one installed top-level package."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from groupseg.cli import COMMANDS, EXAMPLES, main, missing_modules

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "docs" / "cat.jpg"
HEAVY = ("torch", "transformers", "open_clip", "timm", "numpy", "PIL")

# the distribution that installs each module a command may need (import name -> requirement name)
DISTRIBUTION = {"accelerate": "accelerate", "scipy": "scipy", "matplotlib": "matplotlib", "yaml": "pyyaml",
                "webdataset": "webdataset"}


def _python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.subprocess
@pytest.mark.parametrize("argv", [["--help"], ["segment", "--help"], ["groups", "--help"], ["convert", "--help"],
                                  ["info", "--help"], ["segment", str(PHOTO), "--window", "-5"]])
def test_help_and_option_errors_import_nothing_heavy(argv):
    code = ("import sys\nfrom groupseg.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in %r if m in sys.modules))" % (argv, HEAVY))
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", f"groupseg {' '.join(argv)} imported {r.stdout.strip()}"


BAD_OPTIONS = [
    (["segment", "--vocab", "cat", "--window", "-5"], "--window"),
    (["segment", "--vocab", "cat", "--top-k", "-1"], "--top-k"),
    (["segment", "--vocab", "cat", "--threshold", "2"], "--threshold"),
    (["segment", "--vocab", "cat", "--threshold", "nan"], "--threshold"),
    (["segment", "--clusters", "0"], "--clusters"),
    (["segment", "--vocab", "cat", "--short-side", "0"], "--short-side"),
    (["segment", "--vocab", "cat", "--groupings", "0"], "--groupings"),
    (["segment", "--vocab", "cat", "--window", "ten"], "--window"),
    (["groups", "--short-side", "-3"], "--short-side"),
    (["convert", "a", "b", "--dtype", "fp8"], "--dtype"),
]


@pytest.mark.parametrize("argv,option", BAD_OPTIONS, ids=[" ".join(a[-2:]) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_exit_2_and_no_work(argv, option, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [argv[0], str(PHOTO), *argv[1:], "--out", str(out)] if argv[0] != "convert" else argv
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"groupseg {argv[0]}: error: argument {option}"), err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "no-such-device"])
def test_unavailable_device_is_one_line_before_any_work(device, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["segment", str(PHOTO), "--vocab", "cat,grass", "--device", device, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and device in err, err
    assert not out.exists()


def test_device_defaults_to_auto_everywhere():
    from groupseg.cli import build_parser

    for name in ("segment", "groups"):
        args = build_parser(name).parse_args([name, str(PHOTO)])
        assert args.device == "auto", name


@pytest.mark.parametrize("name", [n for n, c in COMMANDS.items() if c.needs])
def test_missing_extra_is_named_in_one_line_before_any_work(name, tmp_path, capsys, monkeypatch):
    cmd = COMMANDS[name]
    blocked = cmd.needs[0]
    monkeypatch.setitem(sys.modules, blocked, None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, cmd.module, raising=False)
    out = tmp_path / "out"
    rc = main([name, "--out", str(out), "--images", str(tmp_path), "--dataset", "camvid", "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == f'groupseg {name} needs {blocked}: pip install "groupseg[{cmd.extra}]"'
    assert cmd.module not in sys.modules, "the command's module was imported before the check"
    assert not out.exists()
    assert main([name, "--help"]) == 2  # even its help says what to install
    assert f'pip install "groupseg[{cmd.extra}]"' in capsys.readouterr().err


def test_missing_module_seen_through_a_blocked_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    assert missing_modules(["accelerate", "json", "surely_not_a_module_xyz"]) == ["accelerate", "surely_not_a_module_xyz"]


def test_each_extra_installs_what_its_commands_need():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}

    for name, cmd in COMMANDS.items():
        if not cmd.needs:
            continue
        provided = names(extras[cmd.extra])
        for module in cmd.needs:
            assert DISTRIBUTION[module] in provided, f'groupseg {name} needs {module}, which "[{cmd.extra}]" does not install'
    core = names(project["dependencies"])
    assert not core & set(DISTRIBUTION.values()), "a training/eval dependency crept into the core install"


@pytest.mark.parametrize("name", [n for n, c in COMMANDS.items() if c.module])
def test_command_table_names_real_functions(name):
    cmd = COMMANDS[name]
    if missing_modules(cmd.needs):
        pytest.skip(f"{name} needs {cmd.needs}, not installed here")
    import importlib

    mod = importlib.import_module(cmd.module)
    assert callable(getattr(mod, cmd.add)) and callable(getattr(mod, cmd.run))


def test_help_examples_name_configs_that_exist():
    from groupseg.training.config import list_configs

    named = re.findall(r"--config (\S+)", EXAMPLES + "".join(c.epilog for c in COMMANDS.values()))
    assert named, "no config example to check"
    for config in named:
        assert config in list_configs(), f"--help names a config that does not ship: {config}"


def test_all_background_result_says_so(tiny_weights, tmp_path, capsys):
    # a threshold no class probability can reach turns every pixel to background
    rc = main(["segment", str(PHOTO), "--vocab", "cat,grass", "--weights", str(tiny_weights), "--short-side", "64",
               "--threshold", "1", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("all background (no class reached --threshold 1"), out


@pytest.mark.subprocess
def test_one_installed_top_level_package(tmp_path):
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["packages"] and all(p == "groupseg" or p.startswith("groupseg.") for p in tool["packages"])
    assert all(k.startswith("groupseg.") for k in tool.get("package-dir", {}))
    # every package folder of the source is listed, or a wheel would leave it out (an editable install hides that)
    mapped = {"groupseg": ROOT / "groupseg", **{k: ROOT / v for k, v in tool["package-dir"].items()}}
    on_disk = set()
    for name, folder in mapped.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if "__pycache__" not in rel:
                on_disk.add(".".join((name, *rel)))
    assert on_disk <= set(tool["packages"]), f"packages missing from pyproject: {sorted(on_disk - set(tool['packages']))}"
    for name in ("training", "eval"):  # outside the repository the generic names are not importable
        r = _python(f"import {name}", cwd=tmp_path)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, f"'import {name}' works: {r.stdout}{r.stderr}"
    r = _python("import groupseg.training.config, groupseg.eval, groupseg.prompting as p; p.prompts_dir(); print('ok')",
                cwd=tmp_path)
    assert r.stdout.strip() == "ok", r.stderr
