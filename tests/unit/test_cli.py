"""The command line: every command is listed, each --help shows examples, and the CLI and the quickstart do
not import each other."""

import subprocess
import sys

import pytest

from llmforge.cli import EXAMPLES, main

COMMANDS = ["quickstart", "prepare", "pretrain", "finetune", "align", "distill", "recipe", "serve", "eval", "compare",
            "config"]


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    text = help_text(capsys, ["--help"])
    for command in COMMANDS:
        assert f"\n    {command}" in text, f"{command} missing from `llmforge --help`"
    assert set(EXAMPLES) == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_has_a_description_and_examples(capsys, command):
    text = help_text(capsys, [command, "--help"])
    assert "examples:" in text and f"llmforge {command}" in text.split("examples:")[1]


def test_quickstart_help_names_its_shipped_settings(capsys):
    from llmforge.samples import SAMPLE_DATA
    text = help_text(capsys, ["quickstart", "--help"])
    assert str(SAMPLE_DATA / "quickstart.yaml") in text
    assert (SAMPLE_DATA / "quickstart.yaml").is_file() and (SAMPLE_DATA / "quickstart-lora.yaml").is_file()


def test_version_names_the_running_copy(capsys):
    import llmforge
    text = help_text(capsys, ["--version"])
    assert llmforge.__version__ in text and str(llmforge.__file__).rsplit("/", 1)[0] in text


def test_cli_and_quickstart_do_not_import_each_other():
    code = ("import sys; import llmforge.{a}; "
            "print('llmforge.{b}' in sys.modules)")
    for a, b in (("cli", "quickstart"), ("quickstart", "cli")):
        out = subprocess.run([sys.executable, "-c", code.format(a=a, b=b)], capture_output=True, text=True,
                             check=True).stdout.strip()
        assert out == "False", f"importing llmforge.{a} imports llmforge.{b}"


def test_an_unknown_override_is_one_paragraph_and_exit_code_2(capsys):
    assert main(["config", "--trian.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmforge config: error:") and "trian" in err and "Traceback" not in err
