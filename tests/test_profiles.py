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
