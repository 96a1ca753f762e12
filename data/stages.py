"""What each training stage reads: templates and the und:gen:text mix (paper, section 4.1).

Defaults only; a stage config overrides any of them. Stage 1 and 2 use the pretraining formats
('<prompt><image>' for generation, caption-style '<image>answer' for understanding), stage 3 (SFT)
the chat template that inference uses. Stage 2 opens with 30:50:20 for `warmup_mix_steps` steps.
"""

from __future__ import annotations

import copy

from data.shards import DataError
from data.stream import parse_schedule

STAGE_DATA = {
    "1": {"gen_template": "plain", "und_template": "plain", "cfg_dropout": 0.1, "caption_prob": 0.0,
          "mix": {"und": 50, "gen": 50, "text": 0}},
    "2": {"gen_template": "plain", "und_template": "plain", "cfg_dropout": 0.1, "caption_prob": 0.0,
          "mix": [{"until": 10_000, "ratio": {"und": 30, "gen": 50, "text": 20}},
                  {"ratio": {"und": 14, "gen": 80, "text": 6}}]},
    "3": {"gen_template": "chat", "und_template": "chat", "cfg_dropout": 0.1, "caption_prob": 0.0,
          "mix": {"und": 21, "gen": 70, "text": 9}},
}


def stage_data(stage: str | int, *, warmup_mix_steps: int | None = None, **overrides) -> dict:
    """The data settings of a stage; warmup_mix_steps moves the end of stage 2's opening mix."""
    key = str(stage)
    if key not in STAGE_DATA:
        raise DataError(f"unknown stage {stage!r}: data settings exist for stages 1, 2, 3")
    settings = copy.deepcopy(STAGE_DATA[key])
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise DataError(f"unknown data setting(s) for stage {key}: {', '.join(unknown)}")
    settings.update(overrides)
    if warmup_mix_steps is not None:
        if key != "2" or not isinstance(settings["mix"], list):
            raise DataError("warmup_mix_steps applies to stage 2's default mix schedule only")
        settings["mix"][0]["until"] = warmup_mix_steps
    parse_schedule(settings["mix"])  # fail early on a bad mix
    return settings
