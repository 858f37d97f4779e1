"""The eval / --compare table names each multiple-choice task's chance level (hand-computed)."""

from sinkdlm.eval.run import CHANCE_LABEL, markdown_table


def results(checkpoint: str, per_task: dict[str, dict[str, float]], n: int) -> dict:
    return {"results": per_task, "n-samples": {t: {"effective": n} for t in per_task},
            "sinkdlm": {"checkpoint": checkpoint, "variant": "sink"}}


def test_chance_row_is_one_over_the_options_and_blank_where_there_are_none():
    run = results("runs/demo/step-00000400", {"arc_easy": {"acc,none": 0.3}, "piqa": {"acc,none": 0.55},
                                              "social_iqa": {"acc,none": 0.34}, "lambada_openai": {"acc,none": 0.01}},
                  n=200)
    lines = markdown_table([run]).splitlines()
    assert lines[0] == ("| checkpoint | arc_easy acc % [95% Wilson CI] | piqa acc % [95% Wilson CI] | social_iqa acc % "
                        "[95% Wilson CI] | lambada_openai acc % [95% Wilson CI] |")
    assert len(lines) == 4
    # 1/4, 1/2, 1/3 of the answers; LAMBADA predicts a word: no chance level
    assert lines[-1] == f"| {CHANCE_LABEL} | 25.0 | 50.0 | 33.3 |  |"


def test_no_chance_row_without_a_multiple_choice_column():
    gsm8k = results("runs/sft/step-00004000", {"gsm8k": {"exact_match,strict-match": 0.0,
                                                         "exact_match,flexible-extract": 0.02}}, n=50)
    lines = markdown_table([gsm8k]).splitlines()
    assert len(lines) == 3 and CHANCE_LABEL not in lines[-1]
