"""Profiles: the bundled ones validate; mistakes name the file, the key and what was expected."""

from __future__ import annotations

import pytest

from anyclaude import profiles


@pytest.mark.parametrize("name", ["tiny", "deep-work", "quick"])
def test_bundled_profiles_load(name):
    loaded = profiles.load(name)
    profile = loaded.profile
    assert loaded.path.name == f"{name}.toml"
    assert profile.resolve("claude-opus-4-8") in profile.models
    assert profile.resolve("claude-3-5-haiku-latest") in profile.models  # the glob catches any claude name
    assert profile.resolve("gpt-4o") is None
    assert profile.timeouts.first_token > 0 and profile.server.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models.a]\npath = "x"\ncolour = "red"\n', "models.a.colour: unknown key"),
        ("[models.a]\npath = 5\n", "models.a.path: expected `str`, got `int`"),
        ('[models.a]\npath = "x"\n[server]\nport = "80"\n', "server.port: expected `int`, got `str`"),
        ('[models.a]\npath = "x"\n[timeouts]\nidel = 3\n', "timeouts.idel: unknown key"),
        ('[models.a]\npath = "x"\n[aliases]\n"claude-*" = "b"\n', 'aliases."claude-*": expected one of the models (a), got \'b\''),
        ("[server]\n", "models: required key missing"),
        ("[models.a\n", "invalid TOML"),
    ],
)
def test_mistakes_are_named(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(profiles.ProfileError) as info:
        profiles.load(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_names_resolve_in_the_user_config_dir_first(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYCLAUDE_HOME", str(tmp_path))
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tiny.toml").write_text('[models.mine]\npath = "x"\n')
    assert profiles.load("tiny").profile.models.keys() == {"mine"}
    assert profiles.load("quick").path == profiles.REPO_PROFILES / "quick.toml"
    with pytest.raises(profiles.ProfileError, match="not found"):
        profiles.load("nonexistent")


def anyclaude(*args, env):
    import subprocess
    import sys

    from bench.harness import REPO

    return subprocess.run([sys.executable, "-m", "anyclaude", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def test_profile_commands_create_edit_validate_and_list(tmp_path):
    import os
    import tomllib

    env = dict(os.environ, ANYCLAUDE_HOME=str(tmp_path))
    made = anyclaude("profiles", "new", "mine", "--from", "quick", "--model", "mlx-community/Some-Coder-7B-4bit", env=env)
    assert made.returncode == 0, made.stderr
    path = tmp_path / "profiles" / "mine.toml"
    data = tomllib.loads(path.read_text())
    assert data["models"] == {"some-coder-7b-4bit": {"path": "mlx-community/Some-Coder-7B-4bit", "max_tokens": 8192}}
    assert set(data["aliases"].values()) == {"some-coder-7b-4bit"}

    assert anyclaude("profiles", "set", "mine", "sampling.temperature=0.3", "timeouts.idle=45", env=env).returncode == 0
    data = tomllib.loads(path.read_text())
    assert data["sampling"]["temperature"] == 0.3 and data["timeouts"]["idle"] == 45

    before = path.read_text()
    bad = anyclaude("profiles", "set", "mine", "sampling.temprature=0.3", env=env)
    assert bad.returncode == 2 and "sampling.temprature: unknown key" in bad.stderr
    assert path.read_text() == before  # validated before writing: nothing changed
    assert not list(path.parent.glob(".*partial"))

    path.write_text(before + "[sampling\n")  # a half-finished edit
    broken = anyclaude("profiles", "set", "mine", "sampling.temperature=0.5", env=env)
    assert broken.returncode == 2 and f"{path}: invalid TOML" in broken.stderr and "Traceback" not in broken.stderr
    path.write_text(before)

    listed = anyclaude("profiles", "list", env=env).stdout
    assert "mine" in listed and "mlx-community/Some-Coder-7B-4bit" in listed and "tiny" in listed
    shown = anyclaude("profiles", "show", "mine", env=env).stdout
    assert "queue_size = 8" in shown and "temperature = 0.3" in shown  # defaults spelled out


def test_a_repo_that_is_not_on_disk_offline_is_a_clear_error(monkeypatch):
    from anyclaude import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelError, match="mlx-community/not-a-real-model-4bit is not on disk and could not be downloaded"):
        models.prepare(profiles.Model(path="mlx-community/not-a-real-model-4bit"))
