"""Mistakes in `sinkdlm eval`'s input are one line, before lm-eval or the Hub are touched."""

import pytest

from sinkdlm.errors import UserError
from sinkdlm.eval.run import EvalConfig, check_task_names


@pytest.mark.parametrize("limit", [0, -3])
def test_a_limit_below_one_is_refused(limit):
    with pytest.raises(UserError, match="must be >= 1"):
        EvalConfig(limit=limit)


def test_a_misspelt_offline_task_is_named_unknown_with_the_closest_and_the_offline_list():
    with pytest.raises(UserError) as caught:
        check_task_names(["arc_eazy"])
    message = str(caught.value)
    assert "unknown task 'arc_eazy'" in message and "did you mean 'arc_easy'" in message
    assert "piqa" in message and "Hub" not in message


def test_offline_and_hub_tasks_pass_the_name_check():
    check_task_names(["arc_easy", "piqa", "lambada_standard", "mmlu_pro"])  # the last two go to the Hub


def test_the_cli_refuses_limit_0_with_exit_2(capsys):
    from sinkdlm.cli import main

    assert main(["eval", "--checkpoint", "nowhere", "--tasks", "arc_easy", "--limit", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
