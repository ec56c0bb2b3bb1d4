"""The README's commands in the order written: every config file they name exists (with its size), and every
folder a command reads (--from, --reuse) is the --workdir of an earlier command. (Static: running them all,
even with tiny overrides, takes far longer than a test may; the one-command main job is tested by
tests/test_compare.py's tiny comparison.)"""
import importlib.util
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("   #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if "experiments/" in part:
                    out.append(shlex.split(part))
    return out


def _flag(argv, name):
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def test_readme_commands_name_existing_configs_and_earlier_workdirs():
    commands = _commands()
    assert len(commands) >= 8
    made = set()
    for argv in commands:
        script = next(a for a in argv if a.startswith("experiments/"))
        assert os.path.isfile(os.path.join(ROOT, script)), script
        config = _flag(argv, "config")
        if config:
            path, _, size = config.partition(":")
            spec = importlib.util.spec_from_file_location("readme_cfg", os.path.join(ROOT, path))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.get_config(size or None)  # the size exists
        for needed in filter(None, [_flag(argv, "from"), _flag(argv, "reuse")]):
            assert needed in made, f"{' '.join(argv)} reads {needed}, which no earlier README command creates"
        if _flag(argv, "workdir"):
            made.add(_flag(argv, "workdir"))
